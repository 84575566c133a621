"""A user's own image files reach the training batches unchanged, or changed only with a count and a reason:
16-bit and EXIF-rotated files, mixed grayscale and colour, files without a class folder, inputs left out."""

import csv
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from genfoundry import cli, config
from genfoundry.data.build import shard_pipeline, training_data
from genfoundry.data.decode import decode
from genfoundry.shards import ShardDataset, ShardError, pack
from genfoundry.sources import SourceError, load_folder
from genfoundry.trainer import Trainer

QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)]  # top-left, top-right, bottom-left, -right


def ramp16(path, side: int = 16) -> None:
    """A 16-bit grayscale PNG (mode I;16) whose levels rise from black to white: mean 0.5."""
    row = np.linspace(0, 65535, side).round().astype(np.uint16)
    Image.fromarray(np.tile(row, (side, 1))).save(path)


def quadrants(width: int, height: int) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    for k, colour in enumerate(QUADRANTS):
        rows = slice(0, height // 2) if k < 2 else slice(height // 2, height)
        image[rows, slice(0, width // 2) if k % 2 == 0 else slice(width // 2, width)] = colour
    return image


def solid(path, value: int, gray: bool = False, side: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (side, side) if gray else (side, side, 3)
    Image.fromarray(np.full(shape, value, np.uint8)).save(path)


def files(root, names):
    for name in names:
        solid(root / name, 40 + 10 * len(name))
    return root


def prepare(data: bytes, resolution: int, channels: int) -> np.ndarray:
    return shard_pipeline(resolution, channels).prepare(data, np.random.default_rng(0))[0]


def data_cfg(source, **values):
    return config.load(None, {"data.source": str(source), "data.workers": 0, **values}).data


def test_16_bit_image_keeps_its_levels_in_shards_folders_and_old_packs(tmp_path, capsys):
    root = tmp_path / "ramps"
    root.mkdir()
    ramp16(root / "ramp.png")
    out = tmp_path / "shards"
    assert cli.main(["pack", str(root), str(out), "--workers", "1"]) == 0
    dataset = ShardDataset(str(out))
    batch = next(iter(shard_pipeline(16, 1).loader(dataset, 1, "cpu", seed=0)))
    assert abs(batch.images.mean().item() - 0.5) < 0.01  # clipped to white it was 0.998
    data, meta = dataset.read(0)
    shard_pixels = prepare(data, 16, 1)
    folder = load_folder(root, 16)
    assert folder.channels == 1 and np.array_equal(folder.images[0], shard_pixels)

    assert "1 stored as lossless PNG instead of their own bytes (1 16-bit)" in capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    assert (index["num_reencoded"], index["reencoded"], index["channels"]) == (1, {"16-bit": 1}, {"1": 1, "3": 0})
    assert (meta["reencoded"], meta["channels"], Image.open(io.BytesIO(data)).mode) == ("16-bit", 1, "L")
    # A keep pack of an older version stored the 16-bit bytes; the loader scales them too.
    old = decode((root / "ramp.png").read_bytes(), (0, 0, 16, 16), (16, 16), 1)
    assert np.array_equal(old, shard_pixels)


def test_exif_orientation_is_applied_on_every_path(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    stored = quadrants(24, 16)  # as the camera wrote it; orientation 6 says: turn it a quarter clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(root / "turned.jpg", quality=100, subsampling=0, exif=exif)
    upright = np.rot90(stored, k=-1)  # 24 high, 16 wide

    index = pack(str(root), str(tmp_path / "shards"), workers=1, progress=False)
    data, meta = ShardDataset(str(tmp_path / "shards")).read(0)
    shard_pixels = prepare(data, 16, 3)  # the short side is 16: the centre 16 x 16 square
    assert np.abs(shard_pixels.astype(int) - upright[4:20]).mean() < 3
    folder = load_folder(root, 16)
    assert np.array_equal(folder.images[0], shard_pixels)

    assert index["reencoded"] == {"EXIF orientation 6": 1}
    assert index["image_sizes"] == {"distinct": 1, "most_common": [16, 24, 1]}  # as stored: upright
    assert meta["reencoded"] == "EXIF orientation 6" and Image.open(io.BytesIO(data)).format == "PNG"


def test_channels_follow_the_majority_and_conversions_are_counted(tmp_path):
    root = files(tmp_path / "mixed", ["b/1.png", "b/2.png", "b/3.png"])
    solid(root / "a" / "0.png", 90, gray=True)  # the first sample: it used to decide for the whole set
    out = tmp_path / "shards"
    index = pack(str(root), str(out), workers=1, progress=False)
    assert training_data(data_cfg(out, **{"data.holdout": 0}), 2, 2, 0, "cpu").channels == 3
    assert index["channels"] == {"1": 1, "3": 3}
    assert index["image_sizes"] == {"distinct": 1, "most_common": [16, 16, 4]}
    assert [ShardDataset(str(out)).read(i)[1]["channels"] for i in range(4)] == [1, 3, 3, 3]

    note = "1 of 4 images are grayscale and are converted to RGB; set --data.channels=1 to train in grayscale"
    for source in (out, root):
        data = training_data(data_cfg(source, **{"data.holdout": 0}), 2, 2, 0, "cpu")
        assert data.channels == 3 and note in data.notes, source
        data = training_data(data_cfg(source, **{"data.holdout": 0, "data.channels": 1}), 2, 2, 0, "cpu")
        assert data.channels == 1 and data.val_images.shape[3] == 1
        assert "3 of 4 images are colour and are converted to grayscale; as --data.channels=1 asks" in data.notes

    # An index.json of format 1 has no counts: the sample headers are read instead.
    for key in ("channels", "num_unlabelled", "image_sizes", "num_reencoded", "reencoded"):
        del index[key]
    (out / "index.json").write_text(json.dumps({**index, "format_version": 1}))
    data = training_data(data_cfg(out, **{"data.holdout": 0}), 2, 2, 0, "cpu")
    assert data.channels == 3 and note in data.notes and any("from the headers of 4 of 4 samples" in n for n in data.notes)

    for i in range(3):
        solid(root / "a" / f"{i + 5}.png", 20 * i, gray=True)
    folder = load_folder(root, 16)
    assert folder.channels == 1
    assert "3 of 7 images are colour and are converted to grayscale; set --data.channels=3 to train in colour" \
        in folder.notes


def test_files_beside_class_folders_train_only_the_null_class(tmp_path):
    root = files(tmp_path / "photos", ["cats/0.png", "dogs/0.png", "dogs/1.png", "x.png", "y.png"])
    folder = load_folder(root, 16)
    assert folder.class_names == ["cats", "dogs"] and folder.labels.tolist() == [0, 1, 1, -1, -1]
    out = tmp_path / "shards"
    index = pack(str(root), str(out), workers=1, progress=False)
    assert index["class_names"] == ["cats", "dogs"] and index["num_unlabelled"] == 2
    assert [ShardDataset(str(out)).read(i)[1]["label"] for i in range(5)] == [0, 1, 1, None, None]
    assert ("2 files at the top of 'photos' have no class folder: they train only the unconditional (null) class"
            in folder.notes)
    shards = training_data(data_cfg(out, **{"data.holdout": 0}), 2, 8, 0, "cpu")
    assert any(n.startswith("2 of 5 samples have no class") for n in shards.notes)
    assert sorted(shards.val_labels.tolist()) == [0, 1, 1, 2, 2]  # 2: the null class

    # Without class folders a folder is one class, named after it; so is a list without labels.
    alone = files(tmp_path / "pets", ["a.png", "b.png"])
    index = pack(str(alone), str(tmp_path / "alone"), workers=1, progress=False)
    assert index["class_names"] == ["pets"] and ShardDataset(str(tmp_path / "alone")).read(1)[1]["label"] == 0
    assert load_folder(alone, 16).labels.tolist() == [0, 0]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path"], ["pets/a.png"], ["pets/b.png"]])
    index = pack(str(tmp_path / "list.csv"), str(tmp_path / "listed"), workers=1, progress=False)
    assert index["class_names"] == ["list"] and index["num_unlabelled"] == 0


@pytest.mark.timeout(60)
def test_trainer_gives_unlabelled_samples_the_null_class(tmp_path):
    root = files(tmp_path / "photos", ["cats/0.png", "cats/1.png", "x.png", "y.png"])
    cfg = config.load("demo", {"data.source": str(root), "data.resolution": 16, "data.holdout": 0,
                               "run.root": str(tmp_path), "run.threads": 1, "model.class_dropout": 0.0,
                               "train.global_batch_size": 4, "train.val_batch_size": 4, "train.warmup_steps": 0})
    trainer = Trainer(cfg, lambda *a, **k: None)
    for _ in range(3):  # adaLN-Zero: the label embedding gets gradients from the third step on
        trainer.train_step()
        trainer.step += 1
    grad = dict(trainer.model.named_parameters())["y_embedder.weight"].grad
    assert grad.shape[0] == 2 and grad[0].abs().sum() > 0
    assert grad[1].abs().sum() > 0  # row 1 = num_classes, the null class; no label is dropped here


def test_every_input_left_out_is_recorded_with_a_reason(tmp_path, monkeypatch):
    root = files(tmp_path / "messy", ["cls/ok0.png", "cls/ok1.png"])
    (root / "cls" / "broken.png").write_text("not an image")
    solid(root / "cls" / "bomb.png", 7, side=64)  # 4096 pixels, over twice the limit set below
    os.symlink(root / "nowhere.png", root / "cls" / "dangling.png")
    os.symlink(root / "cls" / "loop.png", root / "cls" / "loop.png")
    os.symlink(root, root / "cls" / "again")  # a folder link back to an ancestor
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    left_out = ["again", "bomb.png", "broken.png", "dangling.png", "loop.png"]

    out = tmp_path / "shards"
    index = pack(str(root), str(out), workers=1, progress=False)
    assert (index["num_samples"], index["num_inputs"], index["num_failures"]) == (2, 7, 5)
    rows = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(r["source"].rsplit("/", 1)[1] for r in rows) == left_out and all(r["reason"] for r in rows)
    assert "DecompressionBombError" in next(r["reason"] for r in rows if r["source"].endswith("bomb.png"))

    folder = load_folder(root, 16)
    assert len(folder) == 2 and sorted(p.rsplit("/", 1)[1] for p in folder.skipped) == left_out
    assert any(n.startswith("5 of 7 files under 'messy' are left out: ") for n in folder.notes)


@pytest.mark.skipif(os.geteuid() == 0, reason="chmod does not deny root")
def test_unreadable_class_folder_is_one_clear_error(tmp_path, capsys):
    root = files(tmp_path / "photos", ["cats/0.png", "dogs/0.png"])
    (root / "dogs").chmod(0)
    try:
        with pytest.raises(ShardError, match="cannot read the folder '.*dogs'"):
            pack(str(root), str(tmp_path / "shards"), workers=1, progress=False)
        with pytest.raises(SourceError, match="cannot read the folder '.*dogs'"):
            load_folder(root, 16)
        assert cli.main(["pack", str(root), str(tmp_path / "shards"), "--workers", "1"]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    finally:
        (root / "dogs").chmod(0o755)
