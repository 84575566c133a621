"""A user's own images on the default path: mixed sizes, a held-out validation split, and shard errors
that stop the run instead of turning into duplicated samples."""

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from genfoundry import config
from genfoundry.data import DataPipeline, Resize
from genfoundry.data.build import training_data
from genfoundry.data.order import held_out
from genfoundry.shards import ShardDataset, ShardError, pack
from genfoundry.trainer import Trainer

from conftest import run_cli

SIZES = [(20, 30), (32, 32), (40, 24)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 PNGs of three sizes in two class folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir()
        for i in range(12):
            w, h = SIZES[i % 3]
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def photo_shards(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    pack(str(photos), str(out), samples_per_shard=10, workers=1, progress=False)
    return out


def damaged_copy(shards, tmp_path, name: str, damage: str, keep: int):
    """A copy of a shard set with one tar cut to its first `keep` bytes ('truncate') or gone ('remove')."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    tar = copy / name
    if damage == "truncate":
        tar.write_bytes(tar.read_bytes()[:keep])
    else:
        tar.unlink()
    return copy


def data_cfg(source, **values):
    return config.load(None, {"data.source": str(source), **values}).data


def test_mixed_size_shard_set_trains_with_the_defaults(photo_shards, tmp_path):
    """`pack` keeps the original bytes; `train` on them with no resolution option used to stop with a list
    of every size in a batch."""
    result = run_cli("train", "--config", "demo", f"--data.source={photo_shards}", f"--run.root={tmp_path}",
                     "--train.steps=1", "--train.global_batch_size=8", "--train.val_batch_size=8",
                     "--train.sample_every=0", "--data.workers=0", "--sample.per_class=1", "--sample.steps=1",
                     "--run.threads=1")
    assert result.returncode == 0, result.stderr
    assert "resized to 64x64; set --data.resolution" in result.stdout
    meta = json.loads((tmp_path / "demo" / "final" / "model.json").read_text())
    assert meta["arch"]["image_size"] == 64


def test_explicit_resolution_and_uniform_sets_need_no_note(photo_shards, tmp_path):
    data = training_data(data_cfg(photo_shards, **{"data.resolution": 16}), 8, 8, 0, "cpu")
    assert data.resolution == 16 and data.val_images.shape[1:] == (16, 16, 3)
    assert not any("resolution" in n for n in data.notes)
    square = tmp_path / "square"
    square.mkdir()
    for i in range(10):
        Image.fromarray(np.full((24, 24, 3), i * 20, np.uint8)).save(square / f"{i}.png")
    pack(str(square), str(tmp_path / "s"), workers=1, progress=False)
    data = training_data(data_cfg(tmp_path / "s"), 8, 8, 0, "cpu")
    assert data.resolution == 24 and not any("resolution" in n for n in data.notes)


def test_held_out_images_are_never_trained_on(photo_shards, photos):
    """Folders and shard sets validate on images training never sees (they used to validate in-sample)."""
    for source in (photo_shards, photos):
        data = training_data(data_cfg(source, **{"data.holdout": 0.25, "data.resolution": 16}), 6, 32, 0, "cpu")
        assert len(data.val_images) == 6 and "6 of 24 images held out" in " ".join(data.notes)
        loader = data.make_loader(0, 1, 1)
        seen = [loader.next_batch()[0] for _ in range(3)]  # one epoch: 18 training images in 3 batches
        as_uint8 = lambda x: tuple(np.round((x.numpy() + 1) * 127.5).astype(int).ravel())  # noqa: E731
        trained = {as_uint8(x) for batch in seen for x in batch}
        held = {tuple(x.transpose(2, 0, 1).astype(int).ravel()) for x in data.val_images}
        assert len(trained) == 18 and not trained & held, source
    index = held_out(24, 6)
    assert np.array_equal(index, held_out(24, 6)) and len(set(index.tolist())) == 6


def test_shard_loader_skips_held_out_indices_and_counts_the_rest(photo_shards):
    exclude = held_out(24, 4)
    loader = DataPipeline().add_transform(Resize((16, 16))).loader(str(photo_shards), 4, seed=1, exclude=exclude)
    it = iter(loader)
    served = np.concatenate([next(it).indices for _ in range(5)])  # 20 training samples per epoch
    assert sorted(served.tolist()) == sorted(set(range(24)) - set(exclude.tolist()))
    assert loader.state_dict()["num_samples"] == 20


def test_holdout_that_leaves_no_batch_is_one_clear_error(photos):
    with pytest.raises(Exception, match="lower --train.global_batch_size or --data.holdout"):
        training_data(data_cfg(photos), 24, 8, 0, "cpu")


@pytest.mark.parametrize("damage", ["truncate", "remove"])
@pytest.mark.parametrize("workers", [0, 1])
def test_truncated_or_missing_shard_stops_with_one_line(photo_shards, tmp_path, damage, workers):
    """A shard that cannot be read is an error of the whole shard: it used to be caught as a corrupt sample
    and replaced by other samples of the batch, silently duplicating them."""
    copy = damaged_copy(photo_shards, tmp_path, "shard-000001.tar", damage, keep=2048)
    loader = DataPipeline().add_transform(Resize((16, 16))).loader(str(copy), 24, seed=0, num_workers=workers)
    with pytest.raises(ShardError) as e:
        next(iter(loader))
    message = str(e.value)
    assert "\n" not in message and "shard-000001.tar" in message
    assert ("truncated" if damage == "truncate" else "missing") in message
    assert not loader.corrupt


def test_undecodable_sample_is_named_in_a_warning_and_in_the_run_records(photo_shards, tmp_path):
    dataset = ShardDataset(photo_shards)

    class Corrupting:  # the real set with one sample's bytes broken on the way
        shards, url = dataset.shards, dataset.url

        def read(self, index):
            data, meta = dataset.read(index)
            return (b"\x89PNG broken" if index == 3 else data), meta

    loader = DataPipeline().add_transform(Resize((16, 16))).loader(Corrupting(), 24, seed=0)
    loader.failure_log = tmp_path / "failures.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        next(iter(loader))
    assert any("sample 000000003" in str(w.message) and "failed to decode" in str(w.message) for w in caught)
    rows = [json.loads(line) for line in loader.failure_log.read_text().splitlines()]
    assert rows == [{"key": "000000003", "index": 3, "epoch": 0, "rank": 0, "reason": rows[0]["reason"]}]
    assert "DecodeError" in rows[0]["reason"]


def test_trainer_writes_decode_failures_to_the_run_directory(photo_shards, tmp_path):
    cfg = config.load("demo", {"data.source": str(photo_shards), "run.root": str(tmp_path), "data.workers": 0,
                               "train.global_batch_size": 8, "train.val_batch_size": 8, "data.resolution": 16})
    trainer = Trainer(cfg, lambda *a, **k: None)
    assert trainer.loader.failure_log == tmp_path / "demo" / "data-failures.jsonl"


def test_a_truncated_png_body_is_a_decode_failure_not_a_crash(tmp_path):
    """The header reads, the pixels do not: substituted and counted like any undecodable sample."""
    import io

    from genfoundry.data.decode import DecodeError, decode

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()[:300]
    with pytest.raises(DecodeError):
        decode(data, (0, 0, 64, 64), (16, 16))


def test_folders_take_the_same_default_side_as_shard_sets(photos, tmp_path):
    """A folder of mixed sizes trains at 64 with the line that says so; one of equal squares at their side
    (folders used to be brought to 64 without a word)."""
    data = training_data(data_cfg(photos), 8, 8, 0, "cpu")
    assert data.resolution == 64 and any("resized to 64x64; set --data.resolution" in n for n in data.notes)
    square = tmp_path / "square"
    square.mkdir()
    for i in range(10):
        Image.fromarray(np.full((24, 24, 3), i * 20, np.uint8)).save(square / f"{i}.png")
    data = training_data(data_cfg(square), 8, 8, 0, "cpu")
    assert data.resolution == 24 and not any("resolution" in n for n in data.notes)


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_a_broken_shard_set_is_refused_before_training_starts(photo_shards, tmp_path, damage):
    """Checked when the data is built (a stat per file), on every rank: one rank's broken copy used to
    surface in the middle of some batch on that rank only, while its peers waited in a collective."""
    copy = damaged_copy(photo_shards, tmp_path, "shard-000002.tar", damage, keep=1024)
    with pytest.raises(ShardError, match="shard-000002.tar (is missing|has 1024 bytes)"):
        training_data(data_cfg(copy), 8, 8, 0, "cpu")


def test_files_of_other_kinds_are_counted_not_silently_skipped(tmp_path, capsys):
    """A .heic photo is not read: pack and folder training say how many such files there are."""
    from genfoundry.cli import main

    root = tmp_path / "photos"
    (root / "cats").mkdir(parents=True)
    for i in range(9):
        Image.fromarray(np.full((16, 16, 3), i * 25, np.uint8)).save(root / "cats" / f"{i}.png")
    (root / "cats" / "phone.heic").write_bytes(b"not read")
    (root / "notes.txt").write_text("a note")
    (root / ".DS_Store").write_bytes(b"hidden: not counted")
    assert main(["pack", str(root), str(tmp_path / "shards"), "--workers", "1"]) == 0
    assert "2 files under 'photos' are not images genfoundry reads (.heic 1, .txt 1)" in capsys.readouterr().out
    data = training_data(data_cfg(root, **{"data.holdout": 0}), 8, 8, 0, "cpu")
    assert any("2 files under 'photos' are not images genfoundry reads" in n for n in data.notes)
