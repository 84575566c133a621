"""Distributed training with real gloo processes: equivalences, splits, fp16 fallback, dead ranks."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from genfoundry import config, metrics
from genfoundry.api import train
from genfoundry.distributed import parallel

from conftest import ROOT
from multiproc import free_port, run_ranks

QUIET = lambda *a, **k: None  # noqa: E731
TINY = {"train.val_batch_size": 16, "train.log_every": 1, "train.val_every": 3, "train.sample_every": 0,
        "train.checkpoint_every": 0, "train.warmup_steps": 1, "train.steps": 3, "train.global_batch_size": 8,
        "train.grad_clip": 0, "train.ema_halflife_kimg": 0.01, "sample.steps": 1, "sample.per_class": 1,
        "sample.sampler": "euler", "run.threads": 1, "data.hflip": "true"}


def tiny_cfg(root, name, **overrides):
    return config.load("demo", {**TINY, "run.root": str(root), "run.name": name, **overrides})


def _train_rank(rank, world_size, root, name, overrides):
    train(tiny_cfg(root, name, **overrides), QUIET)


def final_weights(run_dir) -> dict:
    return {kind: load_file(str(run_dir / "final" / f"{kind}.safetensors")) for kind in ("model", "ema")}


def assert_close_weights(a: dict, b: dict, atol=2e-5) -> None:
    for kind in a:
        for key in a[kind]:
            torch.testing.assert_close(a[kind][key], b[kind][key], rtol=1e-4, atol=atol, msg=f"{kind}.{key}")


@pytest.mark.timeout(240)
def test_ranks_and_micro_batches_are_equivalent_to_one_big_batch(tmp_path):
    """One rank with a batch of 8 = one rank with 4 micro-batches of 2 = 2 ranks of 4 = 2 ranks x 2 x 2
    = 2 ranks whose gradients go through the torus all-reduce hook."""
    train(tiny_cfg(tmp_path, "one"), QUIET)
    train(tiny_cfg(tmp_path, "accum", **{"train.micro_batch_size": 2}), QUIET)
    run_ranks(_train_rank, 2, tmp_path, "ddp", {}, timeout=180)
    run_ranks(_train_rank, 2, tmp_path, "ddp-accum", {"train.micro_batch_size": 2}, timeout=180)
    run_ranks(_train_rank, 2, tmp_path, "torus", {"parallel.comm_hook": "torus"}, timeout=180)
    one = final_weights(tmp_path / "one")
    for other in ("accum", "ddp", "ddp-accum", "torus"):
        assert_close_weights(one, final_weights(tmp_path / other))
    # ... and they trained: the weights moved from their initial values.
    fresh = tiny_cfg(tmp_path, "fresh")
    from genfoundry.trainer import Trainer

    init = Trainer(fresh, QUIET).net.state_dict()
    assert any(not torch.allclose(init[k], one["model"][k]) for k in init)
    rows = metrics.read_jsonl(tmp_path / "ddp-accum" / "metrics.jsonl")
    assert rows[-1]["images_seen"] == 24 and "val_loss" in rows[-1]


@pytest.mark.timeout(240)
def test_fsdp2_on_two_ranks_matches_one_rank_and_resumes_on_one(tmp_path):
    overrides = {"parallel.strategy": "fsdp", "train.checkpoint_every": 2}
    run_ranks(_train_rank, 2, tmp_path, "fsdp", overrides, timeout=180)
    train(tiny_cfg(tmp_path, "one"), QUIET)
    assert_close_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp"))
    # The checkpoint holds full weights: the same run continues on one rank, with DDP-free training.
    train(tiny_cfg(tmp_path, "fsdp", **{**overrides, "parallel.strategy": "none", "train.steps": 4}), QUIET)
    train(tiny_cfg(tmp_path, "one4", **{"train.steps": 4}), QUIET)
    assert_close_weights(final_weights(tmp_path / "one4"), final_weights(tmp_path / "fsdp"))


def test_global_batch_that_does_not_split_names_the_nearest_valid_sizes():
    with pytest.raises(ValueError, match="nearest valid global batch sizes: 96 or 128"):
        parallel.split_global_batch(100, 4, 8)
    with pytest.raises(ValueError, match="nearest valid global batch sizes: 99 or 102"):
        parallel.micro_batch_candidates(100, 3)
    assert parallel.split_global_batch(8192, 8, 64) == 16
    assert parallel.micro_batch_candidates(24, 2) == [12, 6, 4, 3, 2, 1]


def test_micro_batch_search_backs_off_on_out_of_memory():
    """The search logic, with the out-of-memory error a too-large micro-batch raises on an accelerator."""
    tried = []

    def try_micro(m):
        tried.append(m)
        if m > 40:
            raise torch.OutOfMemoryError("CUDA out of memory")

    chosen = parallel.find_micro_batch(try_micro, parallel.micro_batch_candidates(512, 2), torch.device("cpu"),
                                       QUIET)
    assert chosen == 32 and tried == [256, 128, 64, 32]
    with pytest.raises(ValueError, match="even a micro-batch of 1"):
        parallel.find_micro_batch(lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError()), [4, 2, 1],
                                  torch.device("cpu"), QUIET)


@pytest.mark.timeout(120)
def test_fp16_overflows_skip_steps_then_switch_the_run_to_fp32(tmp_path):
    # A loss scale this large overflows fp16 on every step, however often it is halved.
    cfg = tiny_cfg(tmp_path, "fp16", **{"train.precision": "fp16", "train.loss_scale_init": 1e30,
                                        "train.fp16_max_overflows": 3, "train.steps": 6,
                                        "train.checkpoint_every": 6})
    lines = []
    train(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))))
    rows = metrics.read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    assert [r.get("skipped_steps") for r in rows[1:4]] == [1.0, 1.0, 1.0]
    assert any("switching this run to fp32" in line for line in lines)
    assert rows[3].get("precision_fallback") == 1.0 and "skipped_steps" not in rows[-1]
    from genfoundry import checkpoint

    state = checkpoint.load(tmp_path / "fp16" / "checkpoints" / "step-000000006.pt")
    assert state["precision"] == "fp32"
    init = tiny_cfg(tmp_path, "init")
    from genfoundry.trainer import Trainer

    before = Trainer(init, QUIET).net.state_dict()
    assert any(not torch.equal(before[k], state["model"][k]) for k in before)  # fp32 steps did train


def _rank_env(rank, world, port):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}


@pytest.mark.timeout(180)
def test_a_killed_rank_makes_the_others_exit_within_the_timeout(tmp_path):
    timeout_s = 15
    args = [sys.executable, "-m", "genfoundry", "train", "--config", "demo", f"--run.root={tmp_path}",
            "--run.name=kill", "--train.steps=100000", "--train.log_every=1", "--train.sample_every=0",
            "--train.checkpoint_every=0", "--train.val_every=100000", "--run.threads=1",
            f"--parallel.timeout_s={timeout_s}"]
    port = free_port()
    procs = [subprocess.Popen(args, env=_rank_env(r, 2, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    try:
        log = tmp_path / "kill" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].stderr.read()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=timeout_s + 30)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    err = procs[0].stderr.read()
    assert procs[0].returncode not in (0, None)
    assert waited < timeout_s + 10, f"the surviving rank took {waited:.0f} s to exit"
    assert "lost contact with another rank" in err and "Traceback" not in err, err


@pytest.mark.timeout(240)
def test_nproc_and_two_node_rendezvous_train_like_one_process(tmp_path, cli):
    base = ["--config", "demo", f"--run.root={tmp_path}"] + [f"--{k}={v}" for k, v in TINY.items()]
    r = cli("train", "--nproc", "2", *base, "--run.name=nproc")
    assert r.returncode == 0, r.stderr
    assert "micro-batch 4 x accumulation 1 x 2 rank(s)" in r.stdout, r.stdout
    # Two "nodes" on this machine, one process each, meeting through a c10d rendezvous.
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=two-nodes",
                               "-m", "genfoundry", "train", *base, "--run.name=nodes"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = []
    for node in nodes:
        out, err = node.communicate(timeout=180)
        assert node.returncode == 0, err
        outputs.append(out)
    assert sum("x 2 rank(s)" in out for out in outputs) == 1, outputs  # rank 0 speaks, for two ranks
    train(tiny_cfg(tmp_path, "one"), QUIET)
    one = final_weights(tmp_path / "one")
    assert_close_weights(one, final_weights(tmp_path / "nproc"))
    assert_close_weights(one, final_weights(tmp_path / "nodes"))


@pytest.mark.timeout(240)
def test_topk_compression_trains_reports_bytes_and_resumes_exactly(tmp_path):
    overrides = {"parallel.comm_hook": "topk", "parallel.topk_ratio": 0.05, "parallel.topk_warmup_steps": 2,
                 "train.steps": 4, "train.checkpoint_every": 2}
    run_ranks(_train_rank, 2, tmp_path, "whole", overrides, timeout=180)
    run_ranks(_train_rank, 2, tmp_path, "split", {**overrides, "train.steps": 2}, timeout=180)
    assert (tmp_path / "split" / "checkpoints" / "step-000000002.rank1.pt").is_file()
    run_ranks(_train_rank, 2, tmp_path, "split", overrides, timeout=180)
    whole, split = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    for kind in whole:
        assert all(torch.equal(whole[kind][k], split[kind][k]) for k in whole[kind]), kind
    rows = metrics.read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    last = rows[-1]
    assert last["comm/bytes_per_step"] > 0 and last["comm/compression_ratio"] > 5
    run_ranks(_train_rank, 2, tmp_path, "plain", {"train.steps": 4}, timeout=180)
    plain = metrics.read_jsonl(tmp_path / "plain" / "metrics.jsonl")[-1]
    assert abs(last["val_loss"] - plain["val_loss"]) < 0.1 * plain["val_loss"]
