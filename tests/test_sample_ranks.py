"""`genfoundry sample` and `eval` under a real torchrun: the ranks share the images by global index,
and the images (and the FID) are the same as one process makes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from genfoundry.distributed.launch import torchrun_command
from genfoundry.sampling import rank_batches
from genfoundry.sources import load_images


def test_batches_go_round_robin_and_cover_every_image_once():
    shares = [rank_batches(11, 2, r, 3) for r in range(3)]
    assert [list(map(list, s)) for s in shares] == [[[0, 1], [6, 7]], [[2, 3], [8, 9]], [[4, 5], [10]]]
    assert sorted(i for s in shares for b in s for i in b) == list(range(11))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import run_cli

    tmp = tmp_path_factory.mktemp("ranks")
    ref = tmp / "reference"
    ref.mkdir()
    for i, image in enumerate(load_images("mnist", "test").images[:16]):
        Image.fromarray(image[..., 0]).save(ref / f"{i}.png")
    r = run_cli("train", "--config", "demo", "--train.steps=2", "--train.global_batch_size=8", "--train.sample_every=0",
                "--checkpoint.full_every=0", "--train.time_budget_s=0", "--sample.steps=2", "--sample.per_class=1",
                f"--eval.reference={ref}", "--eval.num_samples=11", "--eval.kid_subset_size=11",
                f"--run.root={tmp / 'runs'}", "--run.name=r", env={"GENFOUNDRY_CACHE": str(tmp / "cache")})
    assert r.returncode == 0, r.stderr
    return tmp


def torchrun(nproc, *args, env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(torchrun_command(nproc, "genfoundry", [str(a) for a in args]), env=full,
                          capture_output=True, text=True, timeout=300)


def test_sample_on_two_ranks_writes_the_same_images_as_one(trained):
    run, env = trained / "runs" / "r", {"GENFOUNDRY_CACHE": str(trained / "cache")}
    common = ("sample", run, "--num-images", 11, "--batch-size", 2, "--sampler", "dpm++2m", "--steps", 3,
              "--device", "cpu")
    one = subprocess.run([sys.executable, "-m", "genfoundry", *map(str, common), "--out", trained / "one"],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *common, "--out", trained / "two", env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("wrote 11 images") == 1  # rank 0 speaks for both
    names = sorted(p.name for p in (trained / "one").glob("0*.png"))
    assert len(names) == 11 and names == sorted(p.name for p in (trained / "two").glob("0*.png"))
    for name in names + ["grid.png"]:
        a, b = (np.asarray(Image.open(trained / d / name)) for d in ("one", "two"))
        assert np.array_equal(a, b), name
    info = json.loads((trained / "two" / "sampling.json").read_text())
    assert info["ranks"] == 2 and info["sampler"] == "dpm++2m" and info["steps"] == 3


def test_eval_on_two_ranks_gives_the_fid_of_one(trained):
    run, env = trained / "runs" / "r", {"GENFOUNDRY_CACHE": str(trained / "cache")}
    args = ("eval", run, "--batch-size", 3, "--device", "cpu")
    one = subprocess.run([sys.executable, "-m", "genfoundry", *map(str, args)],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    alone = json.loads((run / "eval" / "fid-11.json").read_text())
    two = torchrun(2, *args, env=env)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("FID ") == 1
    shared = json.loads((run / "eval" / "fid-11.json").read_text())
    assert shared["ranks"] == 2 and alone["ranks"] == 1
    assert shared["fid"] == pytest.approx(alone["fid"], rel=1e-9, abs=1e-9)


def test_a_reference_that_cannot_serve_is_one_clear_error_on_every_rank(trained, tmp_path):
    run, env = trained / "runs" / "r", {"GENFOUNDRY_CACHE": str(trained / "cache")}
    two = torchrun(2, "eval", run, "--reference", tmp_path / "nowhere", "--device", "cpu", env=env)
    assert two.returncode != 0
    assert two.stderr.count("genfoundry eval: error:") == 2, two.stderr  # each rank says it, in one line
    # torchrun itself reports a failed child with its own traceback; none runs through genfoundry's code
    assert "genfoundry/api.py" not in two.stderr and "lost contact" not in two.stderr
