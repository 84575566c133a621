"""FID references built the way samples are: through the training data path, at the run's resolution
and channels, cached under a key of everything that shaped them."""

import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image

from genfoundry import cli, config
from genfoundry.api import train
from genfoundry.eval import evaluate, fid, prepare, resolve
from genfoundry.features import RESIZES, network_sha256
from genfoundry.sources import load_folder

DEFAULT = "pil-bicubic-uint8"
TINY = {"train.global_batch_size": 2, "train.val_batch_size": 2, "train.log_every": 2, "train.val_every": 2,
        "train.sample_every": 0, "train.warmup_steps": 1, "train.steps": 2, "sample.steps": 1,
        "sample.per_class": 1, "run.threads": 1, "data.workers": 0, "eval.kid_subset_size": 2}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One statistics cache for the module: references computed by one test serve the others."""
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("cache")
        mp.setenv("GENFOUNDRY_CACHE", str(path))
        yield path / "refstats"


def write_images(folder, count, seed, size=48):
    """Smooth random colour fields with detail at `size` px, so that the side they are scored at matters."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        coarse.resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("a") / "photos", 4, seed=0)


@pytest.fixture(scope="module")
def shard_run(tmp_path_factory, photos):
    """A run trained 2 steps at 16 px on a shard set packed from `photos` (48 px PNGs)."""
    from genfoundry.shards import pack

    root = tmp_path_factory.mktemp("shard-run")
    pack(str(photos), str(root / "shards" / "photos"), progress=False)
    train(config.load("demo", {**TINY, "run.root": str(root), "run.name": "shards",
                               "data.source": str(root / "shards" / "photos"), "data.resolution": 16}),
          lambda *a, **k: None)
    return root / "shards", root / "shards" / "photos"


def test_run_trained_on_shards_is_scored_against_its_shards_at_its_resolution(shard_run, cache, capsys):
    run, shards = shard_run
    assert cli.main(["eval", str(run), "--num-samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 generated vs 4 reference images of" in out and "16x16x3, resize pil-bicubic-uint8" in out
    result = json.loads((run / "eval" / "fid-2.json").read_text())
    identity = result["reference_identity"]
    assert identity["kind"] == "shards" and identity["source"] == str(shards) and identity["num_images"] == 4
    assert (identity["resolution"], identity["channels"], identity["resize"]) == (16, 3, DEFAULT)
    assert identity["network_sha256"] == network_sha256()[:12] and result["resize"] == DEFAULT
    assert np.isfinite(result["fid"]) and result["kid_mean"] is not None
    assert "weights auto:" in out and result["weights"] in ("ema", "model")  # the weights sample would take


def test_shard_reference_images_are_decoded_as_training_decodes_them(shard_run):
    from genfoundry.data.build import shard_pipeline
    from genfoundry.eval.reference import images
    from genfoundry.shards import ShardDataset

    _, shards = shard_run
    dataset, pipeline = ShardDataset(str(shards)), shard_pipeline(16, 3)
    expected = np.stack([pipeline.prepare(dataset.read(i)[0], np.random.default_rng(0))[0] for i in range(4)])
    found = images(resolve(str(shards), "train", 16, 3, DEFAULT), batch_size=3)
    assert found.num_images == 4 and not found.left_out
    assert np.array_equal(np.concatenate(list(found.batches)), expected)


def test_folder_reference_is_built_at_the_samples_resolution(photos):
    """Samples made at 16 px and the same images loaded at 16 px score FID 0: the reference is built at
    16 px and upsampled like them, not resized once from 48 px to 299 px."""
    at_16 = load_folder(photos, 16, 3).images
    result = evaluate(at_16, reference=str(photos), kid_subset_size=4)
    assert abs(result["fid"]) < 1e-2, result["fid"]
    assert result["reference_identity"]["kind"] == "folder" and result["reference_identity"]["resolution"] == 16


def test_eval_accepts_a_folder_as_reference(shard_run, photos, capsys):
    run, _ = shard_run
    assert cli.main(["eval", str(run), "--num-samples", "2", "--reference", str(photos)]) == 0
    identity = json.loads((run / "eval" / "fid-2.json").read_text())["reference_identity"]
    assert identity["kind"] == "folder" and identity["source"] == str(photos) and identity["num_images"] == 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make,message", [
    (lambda tmp: tmp / "empty", "no images"),
    (lambda tmp: tmp / "nowhere", "is neither a dataset"),
    (lambda tmp: "mnist", "holds 28x28x1 images but the run makes 16x16x3"),
])
def test_bad_reference_is_one_line_before_any_sample_is_made(shard_run, tmp_path, capsys, make, message):
    """100,000 samples would take hours on this CPU: the error comes in seconds, so none was made."""
    run, _ = shard_run
    (tmp_path / "empty").mkdir()
    t0 = time.perf_counter()
    assert cli.main(["eval", str(run), "--num-samples", "100000", "--reference", str(make(tmp_path))]) == 2
    assert time.perf_counter() - t0 < 20
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("genfoundry eval: error:"), err


def test_a_one_image_reference_is_refused_and_not_cached(shard_run, tmp_path, cache, capsys):
    """One image has no covariance: its NaN statistics used to be cached and break every later eval."""
    run, _ = shard_run
    (tmp_path / "one").mkdir()
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(tmp_path / "one" / "a.png")
    assert cli.main(["eval", str(run), "--num-samples", "2", "--reference", str(tmp_path / "one")]) == 2
    assert "has 1 decodable image(s); FID needs at least 2" in capsys.readouterr().err
    assert not list(cache.glob("one-*.npz"))


def test_cache_is_keyed_by_content_not_by_folder_name(tmp_path, monkeypatch):
    """Two folders named `photos`, given as the same relative path from two directories."""
    monkeypatch.setenv("GENFOUNDRY_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "x" / "photos", 2, seed=1, size=16)
    write_images(tmp_path / "y" / "photos", 2, seed=2, size=16)
    samples = np.random.default_rng(3).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    fids = []
    for where in ("x", "y"):
        monkeypatch.chdir(tmp_path / where)
        fids.append(evaluate(samples, reference="photos", kid_subset_size=2)["fid"])
    assert abs(fids[0] - fids[1]) > 1.0, fids
    assert len(list((tmp_path / "cache" / "refstats").glob("photos-16x16x3-*.npz"))) == 2


def test_key_changes_with_everything_that_shaped_the_statistics(photos, tmp_path, monkeypatch):
    base = resolve(str(photos), "train", 16, 3, DEFAULT)
    others = [resolve(str(photos), "train", 24, 3, DEFAULT), resolve(str(photos), "train", 16, 1, DEFAULT),
              resolve(str(photos), "train", 16, 3, "clean"), resolve(str(photos), "train", 16, 3, DEFAULT, 4)]
    copy = shutil.copytree(photos, tmp_path / "elsewhere" / "photos")  # keeps sizes and times
    assert resolve(str(copy), "train", 16, 3, DEFAULT).key == base.key  # the same files: the path does not count
    os.utime(copy / "0.png", ns=(0, (copy / "0.png").stat().st_mtime_ns + 1))
    others.append(resolve(str(copy), "train", 16, 3, DEFAULT))
    network = tmp_path / "other-network.pt"
    network.write_bytes(b"another network file")
    monkeypatch.setenv("GENFOUNDRY_INCEPTION", str(network))
    others.append(resolve(str(photos), "train", 16, 3, DEFAULT))
    assert len({base.key, *(r.key for r in others)}) == 1 + len(others)


def test_shard_key_is_the_shard_checksums_not_the_path(shard_run, tmp_path):
    _, shards = shard_run
    copy = shutil.copytree(shards, tmp_path / "moved")
    assert resolve(str(copy), "", 16, 3, DEFAULT).key == resolve(str(shards), "train", 16, 3, DEFAULT).key
    index = json.loads((copy / "index.json").read_text())
    index["shards"][0]["sha256"] = "0" * 64
    (copy / "index.json").write_text(json.dumps(index))
    assert resolve(str(copy), "", 16, 3, DEFAULT).key != resolve(str(shards), "train", 16, 3, DEFAULT).key


def test_a_cached_file_of_another_reference_is_not_used(photos, tmp_path):
    rng = np.random.default_rng(0)
    wanted, other = resolve(str(photos), "train", 16, 3, DEFAULT), resolve(str(photos), "train", 16, 3, "clean")
    stats = fid.feature_stats(rng.normal(size=(5, 8)), other.label)
    stats.reference = other
    stats.save(fid.stats_paths(wanted, tmp_path)[1])  # under the name of `wanted`
    notes = []
    assert fid.cached_stats(wanted, tmp_path, notes) is None
    assert len(notes) == 1 and notes[0].endswith("holds statistics of another resize; not used")
    stats.reference = wanted
    stats.save(fid.stats_paths(wanted, tmp_path)[1])
    assert fid.cached_stats(wanted, tmp_path).reference == wanted


def test_shipped_mnist_statistics_serve_only_their_own_reference(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "InceptionFeatures", None)  # any attempt to compute would fail
    s = fid.reference_stats("mnist", "train", 28, 1, DEFAULT, cache_dir=tmp_path)
    assert s.num_images == 60000 and s.reference.content == "mnist:train" and s.reference.resize == DEFAULT
    assert s.reference.network_sha256 == network_sha256()
    assert fid.cached_stats(resolve("mnist", "train", 28, 1, "clean"), tmp_path) is None
    assert fid.cached_stats(resolve("mnist", "test", 28, 1, DEFAULT), tmp_path) is None
    network = tmp_path / "other-network.pt"
    network.write_bytes(b"another network file")
    monkeypatch.setenv("GENFOUNDRY_INCEPTION", str(network))
    assert fid.cached_stats(resolve("mnist", "train", 28, 1, DEFAULT), tmp_path) is None
    assert not list(tmp_path.rglob("*.npz"))


def test_clean_resize_is_float32_bicubic_per_channel_clipped_not_rounded():
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    x = prepare(images, "clean")
    plane = Image.fromarray(images[1, :, :, 2].astype(np.float32)).resize((299, 299), Image.Resampling.BICUBIC)
    torch.testing.assert_close(x[1, 2], (torch.from_numpy(np.array(plane).clip(0, 255)) - 128) / 128, rtol=0, atol=0)
    assert np.array(plane).max() > 255  # bicubic overshoots: the clip is part of the convention
    as_uint8 = prepare(images, DEFAULT)
    assert not torch.equal(x, as_uint8) and (x * 128 + 128 - (x * 128 + 128).round()).abs().max() > 0.1
    assert set(RESIZES) == set(config.EvalConfig.RESIZE_CONVENTIONS)
    with pytest.raises(config.ConfigError, match="eval.resize must be one of pil-bicubic-uint8, clean"):
        config.load("demo", {"eval.resize": "bilinear"})


def test_eval_resize_flag_scores_with_its_own_reference(shard_run, cache, capsys):
    run, _ = shard_run
    assert cli.main(["eval", str(run), "--num-samples", "2", "--resize", "clean", "--max-reference-images", "3"]) == 0
    assert "resize clean" in capsys.readouterr().out
    result = json.loads((run / "eval" / "fid-2.json").read_text())
    assert result["resize"] == "clean" and result["reference_identity"]["resize"] == "clean"
    assert result["num_reference"] == 3 and result["reference_identity"]["max_images"] == 3
    stored = [fid.FeatureStats.load(p).reference for p in cache.glob("photos-16x16x3-*.npz")]
    assert {(r.kind, r.resize, r.max_images) for r in stored} >= {("shards", "clean", 3)}
