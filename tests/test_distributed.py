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
from multiproc import free_port, rank_env as _rank_env, run_ranks

QUIET = lambda *a, **k: None  # noqa: E731
TINY = {"train.val_batch_size": 16, "train.log_every": 1, "train.val_every": 3, "train.sample_every": 0,
        "checkpoint.full_every": 0, "train.warmup_steps": 1, "train.steps": 3, "train.global_batch_size": 8,
        "train.grad_clip": 0, "train.ema_halflife_kimg": 0.01, "sample.steps": 1, "sample.per_class": 1,
        "sample.sampler": "euler", "run.threads": 1, "data.hflip": "true"}


def tiny_cfg(root, name, **overrides):
    return config.load("demo", {**TINY, "run.root": str(root), "run.name": name, **overrides})


def _train_rank(rank, world_size, root, name, overrides):
    train(tiny_cfg(root, name, **overrides), QUIET)


def _train_runs(rank, world_size, root, runs):
    """Several runs, one after another, in one process group (a run of the same name resumes from its
    checkpoint as a new command would); saves spawning ranks per run."""
    for name, overrides in runs:
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
    run_ranks(_train_runs, 2, tmp_path, [("ddp", {}), ("ddp-accum", {"train.micro_batch_size": 2}),
                                         ("torus", {"parallel.comm_hook": "torus"})], timeout=180)
    one = final_weights(tmp_path / "one")
    for other in ("accum", "ddp", "ddp-accum", "torus"):
        assert_close_weights(one, final_weights(tmp_path / other))
    # ... and they trained: the weights moved from their initial values.
    fresh = tiny_cfg(tmp_path, "fresh")
    from genfoundry.trainer import Trainer

    net = Trainer(fresh, QUIET).net
    init = net.state_dict()
    assert any(not torch.allclose(init[k], one["model"][k]) for k in init)
    rows = metrics.read_jsonl(tmp_path / "ddp-accum" / "metrics.jsonl")
    assert rows[-1]["images_seen"] == 24 and "val_loss" in rows[-1]
    # DDP's all-reduce of every fp32 gradient: 2 (p - 1) / p of their bytes, p = 2
    assert rows[-1]["comm/bytes_per_step"] == 4 * sum(p.numel() for p in net.parameters())
    assert rows[-1]["data/wait_fraction.min"] <= rows[-1]["data/wait_fraction.max"]


@pytest.mark.timeout(240)
def test_fsdp2_on_two_ranks_matches_one_rank_and_resumes_on_one(tmp_path):
    overrides = {"parallel.strategy": "fsdp", "checkpoint.full_every": 2}
    run_ranks(_train_rank, 2, tmp_path, "fsdp", overrides, timeout=180)
    train(tiny_cfg(tmp_path, "one"), QUIET)
    assert_close_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "fsdp"))
    # per step: the weights all-gathered for forward and backward, the gradients reduce-scattered
    weights = sum(v.numel() * v.element_size() for v in final_weights(tmp_path / "one")["model"].values())
    assert metrics.read_jsonl(tmp_path / "fsdp" / "metrics.jsonl")[-1]["comm/bytes_per_step"] == 3 * weights // 2
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
                                        "checkpoint.full_every": 6})
    lines = []
    train(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))))
    rows = metrics.read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    assert [r.get("skipped_steps") for r in rows[1:4]] == [1.0, 1.0, 1.0]
    assert any("switching this run to fp32" in line for line in lines)
    assert rows[3].get("precision_fallback") == 1.0 and "skipped_steps" not in rows[-1]
    from genfoundry import checkpoint

    state = checkpoint.read_state(tmp_path / "fp16" / "checkpoints" / "full-000000006" / "state.pt")
    assert state["precision"] == "fp32"
    init = tiny_cfg(tmp_path, "init")
    from genfoundry.trainer import Trainer

    before = Trainer(init, QUIET).net.state_dict()
    assert any(not torch.equal(before[k], state["model"][k]) for k in before)  # fp32 steps did train




# Rank 0 busy for minutes in work of its own (as in a long synchronous write) when rank 1 dies: no
# collective fails to tell it, and parallel.timeout_s is far off. The heartbeat watch must.
_BUSY_RANK_0 = """
import sys, time
from genfoundry import cli
from genfoundry.trainer import Trainer
train_step = Trainer.train_step
def busy(self):
    if self.rank == 0 and self.step == 3:
        time.sleep(600)
    train_step(self)
Trainer.train_step = busy
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
def test_a_killed_rank_makes_the_others_exit_within_seconds_naming_it(tmp_path):
    args = ["train", "--config", "demo", f"--run.root={tmp_path}", "--run.name=kill", "--train.steps=100",
            "--train.log_every=1", "--train.sample_every=0", "--checkpoint.full_every=0",
            "--train.val_every=1000", "--run.threads=1", "--parallel.timeout_s=300"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _BUSY_RANK_0, *args], env=_rank_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        log = tmp_path / "kill" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 4):  # steps 0-3: rank 0 is busy
            assert time.monotonic() < deadline and procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs[0].wait(timeout=60)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
    err = procs[0].stderr.read()
    assert procs[0].returncode == 1
    assert waited < parallel.LOST_AFTER_S + 5, f"the surviving rank took {waited:.0f} s to exit"
    assert "rank 0 lost contact with rank 1 (no answer for 10 s)" in err and "Traceback" not in err, err


# A bug on rank 0 whose message happens to name NCCL and a timeout, as string matching took for a lost peer.
_BUG_ON_RANK_0 = """
import sys
from genfoundry import cli
from genfoundry.trainer import Trainer
train_step = Trainer.train_step
def buggy(self):
    if self.rank == 0 and self.step == 2:
        raise RuntimeError("ProcessGroupNCCL saw nothing: this bug only mentions NCCL and timed out")
    train_step(self)
Trainer.train_step = buggy
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(180)
def test_a_bug_keeps_its_traceback_and_its_peer_says_it_lost_that_rank(tmp_path):
    args = ["train", "--config", "demo", f"--run.root={tmp_path}", "--run.name=bug", "--train.steps=100",
            "--train.log_every=1", "--train.sample_every=0", "--checkpoint.full_every=0",
            "--train.val_every=1000", "--run.threads=1", "--parallel.timeout_s=30"]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _BUG_ON_RANK_0, *args], env=_rank_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = []
    for p in procs:
        _, err = p.communicate(timeout=150)
        errs.append(err)
    assert procs[0].returncode not in (0, 2) and "Traceback" in errs[0] and "this bug only mentions" in errs[0]
    assert "lost contact" not in errs[0], errs[0]
    assert procs[1].returncode == 1 and "lost contact with rank 0" in errs[1] and "Traceback" not in errs[1], errs[1]


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
                 "train.steps": 4, "checkpoint.full_every": 2}
    run_ranks(_train_runs, 2, tmp_path, [("whole", overrides), ("split", {**overrides, "train.steps": 2}),
                                         ("split", overrides), ("plain", {"train.steps": 4})], timeout=180)
    assert (tmp_path / "split" / "checkpoints" / "full-000000002" / "rank-00001.pt").is_file()
    whole, split = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    for kind in whole:
        assert all(torch.equal(whole[kind][k], split[kind][k]) for k in whole[kind]), kind
    rows = metrics.read_jsonl(tmp_path / "whole" / "metrics.jsonl")
    last = rows[-1]
    assert last["comm/bytes_per_step"] > 0 and last["comm/compression_ratio"] > 5
    plain = metrics.read_jsonl(tmp_path / "plain" / "metrics.jsonl")[-1]
    assert abs(last["val_loss"] - plain["val_loss"]) < 0.1 * plain["val_loss"]


# ---- compression under fp16, PowerSGD resume, resume agreement -------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hook", ["topk", "powersgd"])
def test_an_fp16_overflow_with_compression_is_skipped_and_the_run_recovers(tmp_path, hook):
    """A loss scale of 2**22 overflows the first steps; the skipped steps must not leave inf or NaN in
    the error feedback, or every later step overflows too and the run falls back to fp32."""
    overrides = {"train.precision": "fp16", "train.loss_scale_init": 4194304, "train.steps": 12,
                 "train.fp16_max_overflows": 10, "parallel.comm_hook": hook, "parallel.strategy": "ddp",
                 "parallel.topk_ratio": 0.05, "parallel.topk_warmup_steps": 0, "parallel.powersgd_warmup_steps": 0}
    run_ranks(_train_rank, 2, tmp_path, "fp16", overrides, timeout=240)
    rows = metrics.read_jsonl(tmp_path / "fp16" / "metrics.jsonl")
    skipped = [r.get("skipped_steps") for r in rows if "skipped_steps" in r]
    assert skipped[0] == 1.0 and skipped[-3:] == [0.0, 0.0, 0.0], skipped
    assert not any(r.get("precision_fallback") for r in rows)
    weights = final_weights(tmp_path / "fp16")
    assert all(torch.isfinite(v).all() for kind in weights.values() for v in kind.values())


@pytest.mark.timeout(300)
def test_powersgd_resumes_exactly_with_its_error_feedback_and_q(tmp_path):
    overrides = {"parallel.comm_hook": "powersgd", "parallel.powersgd_rank": 2,
                 "parallel.powersgd_warmup_steps": 2, "train.steps": 4, "checkpoint.full_every": 2}
    # Resumed before compression starts (DDP's buckets differ on a resumed run's first step, so Q must
    # not be drawn per bucket), then with error feedback and Q to carry over.
    run_ranks(_train_runs, 2, tmp_path, [("whole", overrides)] + [("split", {**overrides, "train.steps": steps})
                                                                  for steps in (2, 3, 4)], timeout=180)
    whole, split = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    # PowerSGD on gloo is not bit-deterministic (two uninterrupted runs differ by ~1e-8 here); losing its
    # state at the resume moved the weights by ~6e-3.
    for kind in whole:
        for k in whole[kind]:
            torch.testing.assert_close(whole[kind][k], split[kind][k], rtol=0, atol=1e-6, msg=f"{kind}.{k}")
    # Compressed from step 3 on, before and after the resume: no warm-up of dense steps again.
    rows = {r["step"]: r for r in metrics.read_jsonl(tmp_path / "split" / "metrics.jsonl")}
    assert rows[4]["comm/compression_ratio"] > 5


def _resume_rank(rank, world_size, root, name, overrides_per_rank, out):
    try:
        train(tiny_cfg(root, name, **overrides_per_rank[rank]), QUIET)
        message = None
    except Exception as e:  # noqa: BLE001 - the test asserts on what each rank raised
        message = f"{type(e).__name__}: {e}"
    with open(f"{out}/rank{rank}.txt", "w") as f:
        f.write(message or "")


def _node_local(root, steps):
    return [{"run.root": f"{root}/node{r}", "checkpoint.full_every": 2, "train.steps": steps} for r in range(2)]


@pytest.mark.timeout(300)
def test_every_rank_resumes_from_the_step_rank_0_chose_or_all_stop(tmp_path):
    """Node-local run directories: only rank 0's holds the bundle. Rank 1 used to start afresh while
    rank 0 resumed; now both stop, and rank 1 says which file it lacks."""
    run_ranks(_resume_rank, 2, tmp_path, "local", _node_local(tmp_path, 2), str(tmp_path), timeout=180)
    assert (tmp_path / "node0" / "local" / "checkpoints" / "full-000000002" / "state.pt").is_file()
    run_ranks(_resume_rank, 2, tmp_path, "local", _node_local(tmp_path, 4), str(tmp_path), timeout=180)
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert said[1].startswith("CheckpointError: rank 1 cannot resume from step 2, which rank 0 chose"), said
    assert "full-000000002/state.pt is missing" in said[1]
    assert said[0].startswith("CheckpointError: 1 rank(s) cannot resume from step 2"), said


def _topk_overrides(steps):
    return [{"parallel.comm_hook": "topk", "parallel.topk_ratio": 0.05, "train.steps": steps,
             "checkpoint.full_every": 2}] * 2


_TRAIN_THEN_COUNT = """
import gc, sys
from genfoundry import cli
from torch.nn.parallel import DistributedDataParallel
gc.disable()  # no collection by chance: only what the code itself frees counts
code = cli.main(sys.argv[1:])
alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
print(f"rc={code} ddp_alive={alive}")
"""


@pytest.mark.timeout(180)
def test_a_finished_rank_frees_its_trainer_before_the_interpreter_tears_down(tmp_path):
    """The trainer sits in a reference cycle: left to the interpreter's teardown, its DDP reducer and
    gloo groups would be destroyed after Python can no longer run, and a rank could abort on exit."""
    args = ["train", "--config", "demo", f"--run.root={tmp_path}", "--run.name=free",
            *[f"--{k}={v}" for k, v in TINY.items()]]
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _TRAIN_THEN_COUNT, *args], env=_rank_env(r, 2, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=150) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("rc=0 ddp_alive=0" in out for out, _ in outs), outs
