import csv
import importlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from genfoundry.shards import ShardDataset, ShardError, pack
from genfoundry.sources import center_crop_resize, load_images

BAD = ("broken.jpg", "notes.png")


@pytest.fixture
def folder(tmp_path):
    """Two classes of two PNGs and two JPEGs each, one unlabelled image at the top, one corrupt JPEG and
    one text file named like a PNG: 11 inputs, 9 images."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            array = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(root / "top.png")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "dog" / "notes.png").write_text("not an image")
    return root


def good_images(folder):
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in BAD)


@pytest.mark.timeout(30)
def test_pack_folder_counts_and_records_failures(folder, tmp_path):
    out = tmp_path / "shards"
    index = pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    assert (index["num_samples"], index["num_inputs"], index["num_failures"]) == (9, 11, 2)
    assert index["class_names"] == ["cat", "dog"] and index["format_version"] == 2
    assert index["options"] == {"source": str(folder), "samples_per_shard": 3, "resolution": None,
                                "image_format": "keep", "quality": 90}
    # 11 sorted inputs in shards of 3: cat/broken.jpg falls in shard 1, dog/notes.png in shard 3.
    assert [s["num_samples"] for s in index["shards"]] == [3, 2, 3, 1]
    assert [s["first_sample"] for s in index["shards"]] == [0, 3, 5, 8]
    assert json.loads((out / "index.json").read_text()) == index
    for s in index["shards"]:
        assert (out / s["name"]).stat().st_size == s["bytes"] and (out / s["index"]).is_file()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["source"].rsplit("/", 1)[1] for f in failures) == sorted(BAD)
    assert all(f["reason"] for f in failures)
    assert ShardDataset(str(out)).verify() == []


@pytest.mark.timeout(30)
def test_tar_is_in_webdataset_order_and_readable_by_tarfile(folder, tmp_path):
    out = tmp_path / "shards"
    index = pack(str(folder), str(out), samples_per_shard=4, workers=1, progress=False)
    ds = ShardDataset(str(out))
    seen = []
    for s in index["shards"]:
        with tarfile.open(out / s["name"]) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            keys = [n.split(".")[0] for n in names]
            assert keys[0::2] == keys[1::2] and len(names) == 2 * s["num_samples"]
            assert all(n.endswith(".json") for n in names[1::2])
            assert {n.split(".", 1)[1] for n in names[0::2]} <= {"jpg", "png"}
            for k, (image, meta) in enumerate(zip(members[0::2], members[1::2])):
                data, expected = ds.read(s["first_sample"] + k)
                assert tar.extractfile(image).read() == data
                assert json.loads(tar.extractfile(meta).read()) == expected
                assert expected["key"] == keys[2 * k]
        seen += keys[0::2]
    assert len(seen) == len(set(seen)) == 9 and seen == sorted(seen)


@pytest.mark.timeout(30)
def test_read_returns_original_bytes_and_metadata_in_keep_mode(folder, tmp_path):
    out = tmp_path / "shards"
    pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    ds = ShardDataset(str(out))
    by_source = {}
    for i in range(len(ds)):
        data, meta = ds.read(i)
        by_source[meta["source"]] = (data, meta)
    assert sorted(by_source) == [str(p) for p in good_images(folder)]
    for path in good_images(folder):
        data, meta = by_source[str(path)]
        assert data == path.read_bytes()
        assert meta["original_size"] == list(Image.open(path).size) and meta["caption"] is None
        if path.parent == folder:
            assert meta["label"] is None and meta["class_name"] is None
        else:
            assert meta["class_name"] == path.parent.name
            assert meta["label"] == ["cat", "dog"].index(path.parent.name)
    assert ds.shard_of(0) == (0, 0) and ds.shard_of(3) == (1, 0) and ds.shard_of(8) == (3, 0)
    with pytest.raises(IndexError):
        ds.read(9)
    # Pickled into a worker, or used after a fork, the dataset opens its own files.
    clone = pickle.loads(pickle.dumps(ds))
    clone._pid = -1
    assert clone.read(4) == ds.read(4)


@pytest.mark.timeout(30)
def test_empty_shards_and_few_open_files(folder, tmp_path, monkeypatch):
    from genfoundry.shards import reader

    out = tmp_path / "shards"
    index = pack(str(folder), str(out), samples_per_shard=1, workers=1, progress=False)
    assert [s["num_samples"] for s in index["shards"]].count(0) == 2 and index["num_samples"] == 9
    monkeypatch.setattr(reader, "MAX_OPEN_FILES", 2)
    monkeypatch.setattr(reader, "MAX_CACHED_OFFSETS", 3)
    ds = ShardDataset(str(out))
    metas = [ds.read(i)[1] for i in range(9)] + [ds.read(i)[1] for i in reversed(range(9))]
    assert [m["key"] for m in metas[:9]] == [m["key"] for m in reversed(metas[9:])]
    assert len({m["key"] for m in metas}) == 9 and len(ds._fds) == 2 and len(ds._offsets) == 3


@pytest.mark.timeout(30)
def test_resize_mode_is_square_and_png_is_lossless(folder, tmp_path):
    index = pack(str(folder), str(tmp_path / "png"), resolution=16, image_format="png", workers=1, progress=False)
    assert index["options"]["resolution"] == 16
    ds = ShardDataset(str(tmp_path / "png"))
    for i in range(len(ds)):
        data, meta = ds.read(i)
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.size == (16, 16)
        with Image.open(meta["source"]) as original:
            mode = "L" if original.mode == "L" else "RGB"
            expected = center_crop_resize(original.convert(mode), 16)
        assert np.array_equal(np.asarray(image), np.asarray(expected))

    pack(str(folder), str(tmp_path / "jpeg"), resolution=40, image_format="jpeg", quality=95, workers=1,
         progress=False)
    ds = ShardDataset(str(tmp_path / "jpeg"))
    data, meta = ds.read(1)
    image = Image.open(io.BytesIO(data))
    assert image.format == "JPEG" and image.size == (40, 40)
    expected = center_crop_resize(Image.open(meta["source"]).convert("RGB"), 40)
    assert np.abs(np.asarray(image, dtype=float) - np.asarray(expected, dtype=float)).mean() < 12

    # 'keep' with a resolution at or under 64 px stores lossless PNG.
    pack(str(folder), str(tmp_path / "keep"), resolution=32, workers=1, progress=False)
    assert all(Image.open(io.BytesIO(d)).format == "PNG" for d, _ in map(ShardDataset(str(tmp_path / "keep")).read,
                                                                            range(9)))


@pytest.mark.timeout(60)
def test_pack_mnist_test_split_is_lossless(tmp_path):
    out = tmp_path / "mnist"
    index = pack("mnist:test", str(out), samples_per_shard=2500, workers=2, progress=False)
    assert index["num_samples"] == 10000 and index["num_failures"] == 0
    assert [s["num_samples"] for s in index["shards"]] == [2500] * 4
    assert index["class_names"] == [str(d) for d in range(10)]
    ds = ShardDataset(str(out))
    ref = load_images("mnist", "test")
    images, labels = [], []
    for i in range(len(ds)):
        data, meta = ds.read(i)
        images.append(np.asarray(Image.open(io.BytesIO(data))))
        labels.append(meta["label"])
    assert np.array_equal(np.asarray(labels), ref.labels)
    assert np.array_equal(np.stack(images)[..., None], ref.images)
    assert ds.read(9999)[1]["source"] == "mnist:test:9999"


@pytest.mark.timeout(60)
def test_restart_redoes_only_missing_or_stale_shards(folder, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    first = pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    files = sorted(out.glob("shard-*"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in files}
    (out / "shard-000001.tar").unlink()
    (out / ".shard-000002.tar.tmp12345").write_bytes(b"left by an interrupted run")
    again = pack(str(folder), str(out), samples_per_shard=3, workers=2, progress=False)
    assert again == first  # same bytes, same checksums: packing is deterministic
    assert sorted(out.glob("shard-*")) == files and not list(out.glob(".*"))
    for p in files:
        assert (p.stat().st_mtime_ns == mtimes[p.name]) == (not p.name.startswith("shard-000001."))

    # An interrupted pack leaves no index.json (the set is incomplete); the next run finishes it.
    pack_module = importlib.import_module("genfoundry.shards.pack")  # the module, not the function

    def interrupted(task):
        raise KeyboardInterrupt

    (out / "shard-000002.tar").unlink()
    with monkeypatch.context() as m:
        m.setattr(pack_module, "write_shard", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    assert not (out / "index.json").exists()
    with pytest.raises(ShardError, match="no index.json"):
        ShardDataset(str(out))
    assert pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False) == first

    # Other options make every shard stale; fewer shards remove the extra ones.
    other = pack(str(folder), str(out), samples_per_shard=6, resolution=8, workers=1, progress=False)
    assert len(other["shards"]) == 2 and sorted(p.name for p in out.glob("shard-*.tar")) == [
        "shard-000000.tar", "shard-000001.tar"]
    assert all(p.stat().st_mtime_ns != mtimes[p.name] for p in out.glob("shard-*"))
    assert ShardDataset(str(out)).verify() == []


@pytest.mark.timeout(30)
def test_csv_and_parquet_lists_with_labels_and_captions(folder, tmp_path):
    rows = [{"path": f"images/cat/{i}.{'png' if i % 2 else 'jpg'}", "label": "cat", "caption": f"cat {i}"}
            for i in range(4)] + [{"path": "images/dog/0.jpg", "label": "dog", "caption": ""},
                                  {"path": "images/dog/missing.jpg", "label": "dog", "caption": "gone"}]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    index = pack(str(tmp_path / "list.csv"), str(tmp_path / "a"), workers=1, progress=False)
    assert (index["num_samples"], index["num_failures"], index["class_names"]) == (5, 1, ["cat", "dog"])
    ds = ShardDataset(str(tmp_path / "a"))
    metas = [ds.read(i)[1] for i in range(5)]
    assert [m["caption"] for m in metas] == ["cat 0", "cat 1", "cat 2", "cat 3", None]
    assert [m["label"] for m in metas] == [0, 0, 0, 0, 1] and metas[4]["class_name"] == "dog"
    assert ds.read(1)[0] == (folder / "cat" / "1.png").read_bytes()
    assert "missing.jpg" in (tmp_path / "a" / "failures.jsonl").read_text()

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{"path": r["path"], "label": i % 3, "caption": r["caption"] or None}
                                  for i, r in enumerate(rows[:5])])
    pq.write_table(table, tmp_path / "list.parquet")
    index = pack(str(tmp_path / "list.parquet"), str(tmp_path / "b"), workers=1, progress=False)
    assert index["num_samples"] == 5 and index["class_names"] == ["0", "1", "2"]
    ds = ShardDataset(str(tmp_path / "b"))
    metas = [ds.read(i)[1] for i in range(5)]
    assert [m["label"] for m in metas] == [0, 1, 2, 0, 1] and metas[2]["class_name"] == "2"
    assert metas[3]["caption"] == "cat 3" and metas[4]["caption"] is None


@pytest.mark.timeout(30)
def test_fsspec_url_is_cached_and_verified(folder, tmp_path):
    import fsspec

    out = tmp_path / "shards"
    pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    local = ShardDataset(str(out))
    assert [ShardDataset(out.as_uri()).read(i) for i in range(9)] == [local.read(i) for i in range(9)]

    fs = fsspec.filesystem("memory")
    for p in out.iterdir():
        fs.pipe(f"/remote/{p.name}", p.read_bytes())
    cache = tmp_path / "cache"
    ds = ShardDataset("memory://remote", cache_dir=str(cache))
    assert ds.read(0) == local.read(0)
    assert len(list(cache.glob("shard-000000.*.tar"))) == 1 and not list(cache.glob("shard-000001.*"))
    assert [ds.read(i) for i in range(9)] == [local.read(i) for i in range(9)]
    assert ds.verify() == [] and len(list(cache.glob("*.tar"))) == 4

    tar = out / "shard-000002.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert ShardDataset(str(out)).verify() == ["shard-000002.tar does not match its checksum in index.json"]
    fs.pipe("/remote/shard-000002.tar", bytes(data))
    fresh = ShardDataset("memory://remote", cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ShardError, match="checksum"):
        fresh.read(len(fresh) - 2)
    assert [p for p in fresh.verify() if "checksum" in p] and not list((tmp_path / "cache2").glob("shard-000002.*.tar"))
    fs.rm("/remote/shard-000003.tar")
    assert any("shard-000003.tar is missing" in p for p in ShardDataset("memory://remote", str(tmp_path / "c3")).verify())
    fs.rm("/remote", recursive=True)


def bad_source(tmp_path, kind):
    if kind == "empty":
        (tmp_path / "empty").mkdir()
        return str(tmp_path / "empty")
    if ":" in kind and kind.split(":")[0].endswith((".csv", ".txt")):
        name, text = kind.split(":", 1)
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)
    return kind


@pytest.mark.timeout(30)
@pytest.mark.parametrize("kind,kwargs,message", [
    ("/no/such/folder", {}, "source '/no/such/folder' does not exist"),
    ("empty", {}, "no images"),
    ("l.csv:file,label\na.png,1\n", {}, "no 'path' column"),
    ("l.txt:a.png\n", {}, "not a .csv or .parquet"),
    ("m.csv:path,label\na.png,1\nb.png,dog\n", {}, "mixes integers and class names"),
    ("mnist", {"image_format": "gif"}, "image format must be one of keep, jpeg, png, got 'gif'"),
    ("mnist", {"quality": 0}, "quality must be"),
    ("mnist", {"samples_per_shard": 0}, "samples per shard must be"),
    ("mnist:valid", {}, "unknown MNIST split"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, kind, kwargs, message):
    with pytest.raises(ShardError, match=message) as e:
        pack(bad_source(tmp_path, kind), str(tmp_path / "o"), progress=False, **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.timeout(30)
def test_unreadable_sets_are_one_clear_error(tmp_path, folder):
    with pytest.raises(ShardError, match="no index.json"):
        ShardDataset(str(tmp_path))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    with pytest.raises(ShardError, match="none of the 1 inputs"):
        pack(str(tmp_path / "bad"), str(tmp_path / "o"), progress=False, workers=1)
    out = tmp_path / "shards"
    pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    (out / "shard-000001.tar").unlink()
    ds = ShardDataset(str(out))
    assert ds.verify() == ["shard-000001.tar is missing from '%s'" % out]
    with pytest.raises(ShardError, match="missing"):
        ds.read(3)
