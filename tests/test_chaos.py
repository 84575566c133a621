"""`genfoundry chaos`: real kill -9 faults under torchrun, restarts, and the bit-exact verdict."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genfoundry import chaos
from genfoundry.cli import main
from genfoundry.distributed.launch import torchrun_command


@pytest.mark.timeout(300)
def test_two_kills_one_inside_a_checkpoint_write_end_bit_exact(tmp_path, cli):
    out, tmp = tmp_path / "chaos.json", tmp_path / "tmp"
    tmp.mkdir()
    # Seed 5: rank 0 dies in a checkpoint write, then rank 1 at a later step.
    r = cli("chaos", "--trials", 1, "--ranks", 2, "--steps", 8, "--faults", 2, "--seed", 5, "--out", out,
            env={"TMPDIR": str(tmp)}, timeout=280)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("bit-exact 1/1"), r.stdout
    result = json.loads(out.read_text())
    assert result["trials"] == 1 and result["completed"] == 1 and result["bit_exact"] == 1, result
    assert result["faults_injected"] >= 1 and result["faults_planned"] == 2
    assert result["mean_recovery_s"] > 0 and 0 < result["goodput"] and "goodput_definition" in result
    in_write, kill = result["trials_detail"][0]["faults"]
    assert in_write["kind"] == "in-write" and in_write["step"] in (2, 4) and kill["kind"] == "kill"
    assert kill["injected"] and kill["rank"] == 1 and kill["recovery_s"] > 0 and kill["step"] > in_write["step"], kill
    assert not list(tmp.glob("genfoundry-chaos-*"))  # the default working directory is removed afterwards


@pytest.mark.parametrize("args, message", [
    (["--trials", "0"], "--trials must be at least 1, got 0"),
    (["--ranks", "0"], "--ranks must be at least 1, got 0"),
    (["--faults", "-1"], "--faults must be at least 0, got -1"),
    (["--steps", "5"], "--steps 5 is too few for the faults"),
    (["--steps", "12", "--checkpoint.full_every=6"], "--steps 12 is too few for the faults"),
    (["--checkpoint.full_every=0"], "checkpoint.full_every=0 writes no checkpoint"),
    (["--run.name=x"], "--run.name is set by genfoundry chaos for each run"),
    (["--ranks", "3"], "does not split over 3 ranks"),
    (["--train.nope=1"], "unknown config key 'train.nope'"),
])
def test_bad_arguments_are_one_line_errors(args, message, capsys):
    assert main(["chaos", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_faults_are_planned_from_the_seed_inside_the_run():
    plans = [chaos.plan_faults(random.Random(s), 4, 12, 2, 2) for s in range(50)]
    assert plans[0] == chaos.plan_faults(random.Random(0), 4, 12, 2, 2)
    for faults in plans:
        first, *kills = faults
        # A checkpoint step the run outlives by a full interval, on rank 0, which writes the full state.
        assert first.kind == "in-write" and first.rank == 0 and first.step in (2, 4, 6, 8)
        assert all(k.kind == "kill" and first.step < k.step <= 11 and k.rank in (0, 1) for k in kills)
        assert [k.step for k in kills] == sorted(k.step for k in kills)
    assert {f.rank for faults in plans for f in faults[1:]} == {0, 1}
    assert chaos.plan_faults(random.Random(0), 0, 12, 2, 2) == []


def test_recovery_runs_from_the_kill_to_the_first_step_past_the_resume_that_follows():
    rows = [{"step": 0, "time": 10.0}, {"step": 1, "time": 11.0}, {"step": 2, "time": 12.0},
            {"step": 3, "time": 13.0},                                    # killed at 13.5, checkpoint at 2
            {"event": "resume", "step": 2, "time": 20.0}, {"step": 2, "time": 20.5},
            {"step": 3, "time": 21.0}, {"step": 4, "time": 22.0}]
    early, late = chaos.Fault("kill", 3, 1, True, 13.5), chaos.Fault("kill", 4, 0, True, 22.5)
    chaos._measure_recoveries([early, late], rows)
    assert early.recovery_s == pytest.approx(21.0 - 13.5) and late.recovery_s is None
    assert chaos._attempt_step(rows) == 4 and chaos._attempt_step(rows[:5]) == 2 and chaos._attempt_step([]) is None


def test_worker_pids_are_the_launchers_children_by_rank(tmp_path):
    """A launcher process with two children that carry RANK, as torchrun's workers do."""
    script = ("import os, subprocess, sys, time\n"
              "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
              " env={**os.environ, 'RANK': str(r)}) for r in range(2)]\n"
              "print(' '.join(str(k.pid) for k in kids), flush=True)\n"
              "time.sleep(60)\n")
    launcher = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                                start_new_session=True)
    try:
        kids = [int(pid) for pid in launcher.stdout.readline().split()]
        assert chaos.worker_pids(launcher.pid) == {0: kids[0], 1: kids[1]}
        assert chaos.worker_pids(kids[0]) == {}
    finally:
        os.killpg(launcher.pid, 9)
        launcher.wait()


def test_a_run_past_its_time_limit_is_killed_with_its_workers(tmp_path):
    with pytest.raises(RuntimeError, match=r"did not complete \(did not finish within 5 s"):
        chaos.run(trials=1, steps=6, faults=1, workdir=str(tmp_path), trial_timeout_s=5,
                  print_fn=lambda *a, **k: None)
    time.sleep(0.5)
    left = []
    for proc in Path("/proc").iterdir():
        try:
            if str(tmp_path).encode() in (proc / "cmdline").read_bytes():
                left.append(proc.name)
        except OSError:
            continue
    assert not left, f"processes of the killed run still alive: {left}"
    assert (tmp_path / "reference" / "torchrun.err").is_file()


def test_torchrun_restarts_only_when_asked():
    assert "--max-restarts=3" in torchrun_command(2, "genfoundry", ["train"], max_restarts=3)
    assert not any(a.startswith("--max-restarts") for a in torchrun_command(2, "genfoundry", ["train"]))


@pytest.mark.timeout(120)
def test_train_max_restarts_goes_to_torchrun(tmp_path, cli):
    r = cli("train", "--config", "demo", "--max-restarts", "2", f"--run.root={tmp_path}", "--dry-run", timeout=110)
    assert r.returncode == 0, r.stderr
    assert "[checkpoint]" in r.stdout
