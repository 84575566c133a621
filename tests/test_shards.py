import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from genfoundry.shards import ShardDataset, ShardError, pack
from genfoundry.sources import load_images


@pytest.fixture
def folder(tmp_path):
    """Four PNGs and four JPEGs in two classes, one corrupt JPEG and one text file named like an image."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            array = rng.integers(0, 255, (20 + i, 30, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f"{i}.{'png' if i % 2 else 'jpg'}")
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (root / "dog" / "notes.png").write_text("not an image")
    return root


def test_pack_folder_records_failures_and_keeps_bytes(folder, tmp_path):
    out = tmp_path / "shards"
    index = pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    assert index["num_samples"] == 8 and index["num_inputs"] == 10 and index["num_failures"] == 2
    assert index["class_names"] == ["cat", "dog"] and index["format_version"] == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert {f["source"].rsplit("/", 1)[1] for f in failures} == {"broken.jpg", "notes.png"}
    assert all(f["reason"] for f in failures)
    ds = ShardDataset(str(out))
    originals = sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in ("broken.jpg", "notes.png"))
    by_source = {}
    for i in range(len(ds)):
        data, meta = ds.read(i)
        by_source[meta["source"]] = (data, meta)
    for path in originals:
        data, meta = by_source[str(path)]
        assert data == path.read_bytes()
        assert meta["class_name"] == path.parent.name and meta["label"] == ["cat", "dog"].index(path.parent.name)
        assert meta["original_size"] == list(Image.open(path).size)


def test_tar_is_in_webdataset_order_and_readable_by_tarfile(folder, tmp_path):
    out = tmp_path / "shards"
    pack(str(folder), str(out), samples_per_shard=100, workers=1, progress=False)
    with tarfile.open(out / "shard-000000.tar") as tar:
        names = tar.getnames()
    keys = [n.split(".")[0] for n in names]
    assert keys[0::2] == keys[1::2]
    assert all(n.endswith(".json") for n in names[1::2]) and all(not n.endswith(".json") for n in names[0::2])


def test_resize_mode_png_is_lossless_and_square(folder, tmp_path):
    out = tmp_path / "shards"
    pack(str(folder), str(out), resolution=16, image_format="png", workers=1, progress=False)
    ds = ShardDataset(str(out))
    data, meta = ds.read(0)
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (16, 16)
    from genfoundry.sources import center_crop_resize

    expected = center_crop_resize(Image.open(meta["source"]).convert("RGB"), 16)
    assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.timeout(120)
def test_pack_mnist_test_split_is_lossless(tmp_path):
    out = tmp_path / "mnist"
    index = pack("mnist:test", str(out), samples_per_shard=2500, workers=2, progress=False)
    assert index["num_samples"] == 10000 and len(index["shards"]) == 4
    ds = ShardDataset(str(out))
    ref = load_images("mnist", "test")
    for i in (0, 2499, 2500, 9999):
        data, meta = ds.read(i)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), ref.images[i, :, :, 0])
        assert meta["label"] == ref.labels[i]


def test_restart_redoes_only_missing_shards(folder, tmp_path):
    out = tmp_path / "shards"
    first = pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}
    (out / "shard-000001.tar").unlink()
    again = pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    assert again == first
    for name, mtime in mtimes.items():
        if name != "shard-000001.tar":
            assert (out / name).stat().st_mtime_ns == mtime


def test_csv_and_parquet_lists_with_labels_and_captions(folder, tmp_path):
    rows = [{"path": f"images/cat/{i}.{'png' if i % 2 else 'jpg'}", "label": "cat", "caption": f"cat {i}"}
            for i in range(4)] + [{"path": "images/dog/0.jpg", "label": "dog", "caption": ""}]
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["path", "label", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    index = pack(str(tmp_path / "list.csv"), str(tmp_path / "a"), workers=1, progress=False)
    assert index["num_samples"] == 5 and index["class_names"] == ["cat", "dog"]
    _, meta = ShardDataset(str(tmp_path / "a")).read(1)
    assert meta["caption"] == "cat 1" and meta["class_name"] == "cat"

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"path": r["path"], "label": i % 2} for i, r in enumerate(rows)]),
                   tmp_path / "list.parquet")
    index = pack(str(tmp_path / "list.parquet"), str(tmp_path / "b"), workers=1, progress=False)
    assert index["num_samples"] == 5
    assert [ShardDataset(str(tmp_path / "b")).read(i)[1]["label"] for i in range(5)] == [0, 1, 0, 1, 0]


def test_fsspec_url_is_cached_and_verified(folder, tmp_path):
    import fsspec

    out = tmp_path / "shards"
    pack(str(folder), str(out), samples_per_shard=3, workers=1, progress=False)
    fs = fsspec.filesystem("memory")
    for p in out.iterdir():
        fs.pipe(f"/remote/{p.name}", p.read_bytes())
    ds = ShardDataset("memory://remote", cache_dir=str(tmp_path / "cache"))
    local = ShardDataset(str(out))
    assert all(ds.read(i) == local.read(i) for i in range(len(ds)))
    assert ds.verify() == [] and list((tmp_path / "cache").rglob("shard-000000.tar"))

    tar = out / "shard-000002.tar"
    data = bytearray(tar.read_bytes())
    data[1000] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert any("checksum" in p for p in ShardDataset(str(out)).verify())
    fs.pipe("/remote/shard-000002.tar", bytes(data))
    fresh = ShardDataset("memory://remote", cache_dir=str(tmp_path / "cache2"))
    with pytest.raises(ShardError, match="checksum"):
        fresh.read(len(fresh) - 1)


@pytest.mark.parametrize("src,kwargs,message", [
    ("/no/such/folder", {}, "is not an image folder"),
    ("mnist", {"image_format": "gif"}, "image format must be one of"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, src, kwargs, message):
    with pytest.raises(ShardError, match=message):
        pack(src, str(tmp_path / "o"), progress=False, **kwargs)


def test_list_without_path_column_is_refused(tmp_path):
    (tmp_path / "l.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(ShardError, match="no 'path' column"):
        pack(str(tmp_path / "l.csv"), str(tmp_path / "o"), progress=False)


def test_missing_index_is_one_clear_error(tmp_path):
    with pytest.raises(ShardError, match="no index.json"):
        ShardDataset(str(tmp_path))
