"""The checkpoint tiers on real files: staging, manifests, keeping, torn and corrupt checkpoints,
leftovers, the fsspec remote (memory filesystem and a failing one), snapshots, kill -9 mid-write."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from genfoundry import checkpoint
from genfoundry.checkpoint.manager import CheckpointManager

from conftest import ROOT

CPU = torch.device("cpu")


def manager(directory, lines=None, **kw) -> CheckpointManager:
    return CheckpointManager(directory, CPU, warn=(lines.append if lines is not None else None), **kw)


def state(step: int) -> dict:
    return {"step": step, "w": torch.full((64, 64), float(step)), "nested": {"m": [torch.arange(3) + step, "x"]}}


def test_a_save_copies_the_state_then_writes_it_with_a_manifest(tmp_path):
    m = manager(tmp_path)
    live = state(1)
    stall = m.save("full", 1, live, images_seen=8)
    live["w"].add_(100)  # training goes on and changes the weights: the checkpoint keeps the staged copy
    assert m.wait() == []
    path = tmp_path / "full-000000001"
    manifest = checkpoint.verify(path)
    assert manifest["step"] == 1 and manifest["kind"] == "full" and manifest["meta"]["images_seen"] == 8
    assert set(manifest["files"]) == {"state.pt"} and len(manifest["files"]["state.pt"]["sha256"]) == 64
    saved = checkpoint.read_state(path / "state.pt")
    assert torch.equal(saved["w"], torch.full((64, 64), 1.0)) and saved["nested"]["m"][1] == "x"
    assert 0 <= stall < 5 and m.records[0]["durable_s"] >= stall
    m.close()


def test_the_newest_k_are_kept_and_the_newest_good_one_is_chosen(tmp_path):
    lines = []
    m = manager(tmp_path, lines, keep=3)
    for step in (2, 4, 6, 8):
        m.save("full", step, state(step))
    m.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full-000000004", "full-000000006", "full-000000008"]
    newest = tmp_path / "full-000000008" / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, another checksum
    with checkpoint.atomic_writer(newest) as f:
        f.write(bytes(data))
    (tmp_path / "full-000000006" / "manifest.json").unlink()  # torn: its save never finished
    assert m.newest() == 4
    assert any("full-000000008: state.pt does not match its SHA-256" in line for line in lines), lines
    assert any("full-000000006 has no manifest.json (its save was interrupted)" in line for line in lines), lines
    m.close()


def test_leftovers_of_interrupted_saves_are_removed_and_reported(tmp_path):
    (tmp_path / ".full-000000009.tmp").mkdir(parents=True)
    (tmp_path / ".full-000000009.tmp" / "state.pt").write_bytes(b"half")
    (tmp_path / ".state.pt.tmp1234").write_bytes(b"half")
    lines = []
    m = manager(tmp_path, lines)
    assert m.clean() == [".full-000000009.tmp", ".state.pt.tmp1234"]
    assert list(tmp_path.iterdir()) == [] and "removed 2 leftover(s)" in lines[0]
    m.close()


def test_the_remote_tier_keeps_k_and_gives_back_what_the_local_disk_lost(tmp_path):
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://genfoundry-test-{os.getpid()}"
    m = manager(tmp_path / "a", remote=url, keep=1, keep_remote=2)
    for step in (1, 2, 3):  # a local checkpoint that is still uploading is not pruned under the upload
        m.save("full", step, state(step))
        m.wait(uploads=step < 3)  # (uploads still queued when a newer one comes are left to it)
    assert m.close() is None and m.failures == []
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["full-000000003"]
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == ["full-000000002", "full-000000003"]
    # A new machine: nothing on its local disk; the newest remote checkpoint comes down verified.
    fresh = manager(tmp_path / "b", remote=url)
    assert fresh.newest() == 3
    assert torch.equal(fresh.read(3)["w"], torch.full((64, 64), 3.0))
    fresh.close()
    fs.rm(root, recursive=True)


def test_a_failing_upload_is_retried_reported_and_never_stops_the_save(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    lines = []
    m = manager(tmp_path / "local", lines, remote=f"file://{blocker}/remote", retries=2)
    m.save("full", 1, state(1))
    failures = m.wait()
    assert len(failures) == 1 and "failed after 2 attempt(s)" in failures[0], failures
    assert lines == failures
    checkpoint.verify(tmp_path / "local" / "full-000000001")  # the local tier has it all the same
    m.close()


def test_a_snapshot_is_ema_weights_and_model_json(tmp_path):
    m = manager(tmp_path, asynchronous=False)
    ema = {"a.weight": torch.randn(4, 4), "b": torch.arange(5.0)}
    m.save("snapshot", 7, ema, preset="DiT-T/4", class_names=["0", "1"])
    path = tmp_path / "snapshot-000000007"
    assert (path / "manifest.json").is_file()  # synchronous: on disk when save returns
    assert all(torch.equal(v, load_file(str(path / "ema.safetensors"))[k]) for k, v in ema.items())
    meta = json.loads((path / "model.json").read_text())
    assert meta["step"] == 7 and meta["preset"] == "DiT-T/4" and meta["class_names"] == ["0", "1"]
    m.close()


_KILLED_IN_WRITE = """
import sys, torch
from genfoundry.checkpoint.manager import CheckpointManager
m = CheckpointManager(sys.argv[1], torch.device("cpu"))
m.save("full", 2, {"w": torch.zeros(1 << 20)})
m.wait()
m.save("full", 4, {"w": torch.ones(1 << 20)})
m.wait()
print("not reached")
"""


def test_kill_9_in_the_middle_of_a_write_leaves_the_last_good_checkpoint(tmp_path):
    marker = tmp_path / "fired"
    env = {**os.environ, "PYTHONPATH": str(ROOT), checkpoint.FAULT_KILL_IN_WRITE: f"4:0:{marker}"}
    r = subprocess.run([sys.executable, "-c", _KILLED_IN_WRITE, str(tmp_path / "ck")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL and marker.exists() and "not reached" not in r.stdout, r.stderr
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names[0] == ".full-000000004.tmp" and "full-000000002" in names and "full-000000004" not in names
    lines = []
    m = manager(tmp_path / "ck", lines)
    m.clean()
    assert m.newest() == 2 and sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["full-000000002"]
    m.close()


@pytest.mark.timeout(120)
def test_a_snapshot_of_an_unfinished_run_samples_through_the_cli(tmp_path):
    from genfoundry import config
    from genfoundry.api import train
    from genfoundry.cli import main

    overrides = {"train.global_batch_size": 8, "train.val_batch_size": 16, "train.log_every": 2, "train.val_every": 4,
                 "train.sample_every": 0, "sample.steps": 1, "sample.per_class": 1, "run.threads": 1,
                 "run.root": str(tmp_path), "train.steps": 2, "checkpoint.snapshot_every": 1}
    train(config.load("demo", overrides), lambda *a, **k: None)
    run = tmp_path / "demo"
    (run / "final" / "model.json").unlink()  # as if it were still training
    assert main(["sample", str(run), "--snapshot", "latest", "--num-images", "2", "--device", "cpu"]) == 0
    info = json.loads((run / "samples" / "sampled-000000002" / "sampling.json").read_text())
    assert info["step"] == 2 and info["weights"] == "ema" and info["num_images"] == 2
    assert main(["sample", str(run), "--snapshot", "7", "--device", "cpu"]) == 2
