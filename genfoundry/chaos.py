"""`genfoundry chaos`: kill ranks of a small torchrun run with SIGKILL (at random steps, and once in the
middle of a checkpoint write), let torchrun restart them, and check that the run still ends with the
same weights, bit for bit, as the same run without faults.

The controller watches the run through its metrics.jsonl (rank 0 appends one row per step, and an
event row at each resume) and finds the workers as the children of the torchrun process in /proc.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from genfoundry import config as config_lib
from genfoundry.checkpoint.manager import FAULT_KILL_IN_WRITE  # "STEP:RANK:MARKER": a kill mid-write
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.errors import ConfigError, GenfoundryError, writable_directory

FORMAT_VERSION = 1
# Every step logged and validated only at the end, no grids, the smallest batches: faults, not training,
# take the time.
SMALL_RUN = {"train.val_batch_size": 16, "train.log_every": 1, "train.sample_every": 0, "train.warmup_steps": 1,
             "train.global_batch_size": 8, "sample.steps": 1, "sample.per_class": 1, "sample.sampler": "euler",
             "run.threads": 1, "checkpoint.full_every": 2}
POLL_S = 0.02  # a step of the small run takes about 0.2 s on a CPU
LOG_TAIL_LINES = 20
GOODPUT_DEFINITION = ("wall time of the fault-free reference run / wall time of the trial, both from launching "
                      "torchrun to its exit; 0 for a trial that did not complete; mean over trials")
RECOVERY_DEFINITION = ("time of the kill (for the in-write kill, the marker file's mtime) to the time of the first "
                       "metrics row with a step past the step of the resume that follows it; mean over faults")


@dataclass
class Fault:
    """One planned fault and what became of it."""

    kind: str                       # "in-write": rank `rank` kills itself writing step `step`'s checkpoint;
                                    # "kill": the controller sends SIGKILL once the run has logged `step`
    step: int
    rank: int
    injected: bool = False
    time: float | None = None       # unix time of the kill
    at_step: int | None = None      # the newest step the run had logged when it was killed
    recovery_s: float | None = None
    note: str = ""                  # why it was not injected or its recovery not measured


def run(config: str = "demo", trials: int = 3, ranks: int = 2, steps: int = 12, faults: int = 2, seed: int = 0,
        max_restarts: int | None = None, workdir: str | None = None, out: str | None = None,
        overrides: list[str] | tuple[str, ...] = (), trial_timeout_s: float = 600.0, print_fn=print) -> dict:
    """Runs the fault-free reference once, then `trials` trials with `faults` faults each; returns the
    summary that `out` receives as JSON. `overrides` are --section.key=value arguments for the run."""
    max_restarts = faults + 1 if max_restarts is None else max_restarts
    train_args = [f"--{k}={v}" for k, v in SMALL_RUN.items()] + [f"--train.val_every={steps}",
                                                                 f"--train.steps={steps}", *overrides]
    cfg = _check(config, trials, ranks, faults, max_restarts, trial_timeout_s, train_args)
    steps, full_every = cfg.train.steps, cfg.checkpoint.full_every
    if out:
        writable_directory(Path(out).expanduser().absolute().parent, ConfigError)
    root = writable_directory(workdir, ConfigError) if workdir else Path(tempfile.mkdtemp(prefix="genfoundry-chaos-"))
    if workdir and any((root / name).exists() for name in ("reference", "trial-0")):
        raise ConfigError(f"--workdir {workdir} already holds a chaos run; give a new or empty directory")
    launch = dict(config=config, train_args=train_args, ranks=ranks, max_restarts=max_restarts,
                  timeout_s=trial_timeout_s, steps=steps, full_every=full_every)
    try:
        reference = _launch(root / "reference", [], **launch)
        if not reference["completed"]:
            tail = "\n".join(reference.get("log_tail", []))
            raise RuntimeError(f"the fault-free reference run did not complete ({reference['reason']}):\n{tail}")
        print_fn(f"reference: {reference['wall_s']:.1f} s without faults, {ranks} rank(s), {steps} steps", flush=True)
        details = []
        for trial in range(trials):
            planned = plan_faults(random.Random(seed + trial), faults, steps, full_every, ranks)
            detail = {"trial": trial, "seed": seed + trial, **_launch(root / f"trial-{trial}", planned, **launch)}
            if detail["completed"]:
                detail["mismatch"] = compare_final_weights(root / "reference" / "run", root / f"trial-{trial}" / "run")
                detail["bit_exact"] = detail["mismatch"] is None
            detail["goodput"] = reference["wall_s"] / detail["wall_s"] if detail["completed"] else 0.0
            details.append(detail)
            print_fn(_trial_line(detail, trials), flush=True)
    finally:
        if not workdir:
            shutil.rmtree(root, ignore_errors=True)
    summary = _summary(details, reference, recipe=config, ranks=ranks, steps=steps, faults=faults, seed=seed,
                       max_restarts=max_restarts, overrides=list(overrides))
    if out:
        write_atomic(Path(out).expanduser(), (json.dumps(summary, indent=2) + "\n").encode())
    recovery = f"{summary['mean_recovery_s']:.1f} s" if summary["mean_recovery_s"] is not None else "n/a"
    print_fn(f"bit-exact {summary['bit_exact']}/{trials} (completed {summary['completed']}/{trials}, faults injected "
             f"{summary['faults_injected']}/{summary['faults_planned']}, mean recovery {recovery}, goodput "
             f"{summary['goodput']:.2f})", flush=True)
    return summary


def _check(config: str, trials: int, ranks: int, faults: int, max_restarts: int, trial_timeout_s: float,
           train_args: list[str]) -> config_lib.Config:
    """The resolved config of the small run, or one ConfigError for an option that cannot work."""
    for flag, value, least in (("--trials", trials, 1), ("--ranks", ranks, 1), ("--faults", faults, 0),
                               ("--max-restarts", max_restarts, 0)):
        if value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    if trial_timeout_s <= 0:
        raise ConfigError(f"--trial-timeout must be positive, got {trial_timeout_s}")
    if not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists():
        raise GenfoundryError("genfoundry chaos finds the worker processes in /proc/PID/task/PID/children, "
                              "which only Linux provides")
    overrides = config_lib.parse_overrides(train_args)
    for key in ("run.root", "run.name"):
        if key in overrides:
            raise ConfigError(f"--{key} is set by genfoundry chaos for each run; leave it out")
    cfg = config_lib.load(config, overrides)
    from genfoundry.distributed.parallel import micro_batch_candidates

    micro_batch_candidates(cfg.train.global_batch_size, ranks)  # a global batch that does not split: one line
    full_every, steps = cfg.checkpoint.full_every, cfg.train.steps
    if faults and not full_every:
        raise ConfigError("checkpoint.full_every=0 writes no checkpoint to kill a write of or resume from; "
                          "leave --checkpoint.full_every out or make it positive")
    if faults and steps < 2 * full_every + 2:
        raise ConfigError(f"--steps {steps} is too few for the faults: the in-write kill and the kills after it "
                          f"need at least {2 * full_every + 2} steps with checkpoint.full_every={full_every}")
    return cfg


def plan_faults(rng: random.Random, faults: int, steps: int, full_every: int, ranks: int) -> list[Fault]:
    """The first fault kills rank 0 (it writes the full checkpoint) in the write of a checkpoint early
    enough that the run outlives the next one: by then the write is over, injected or not, and the kills
    can follow. The others kill random ranks at random later steps, one after another."""
    if not faults:
        return []
    first = Fault("in-write", rng.choice(range(full_every, steps - full_every - 1, full_every)), 0)
    later = sorted(rng.randint(first.step + 1, steps - 1) for _ in range(faults - 1))
    return [first] + [Fault("kill", step, rng.randrange(ranks)) for step in later]


def _launch(trial_dir: Path, faults: list[Fault], *, config: str, train_args: list[str], ranks: int,
            max_restarts: int, timeout_s: float, steps: int, full_every: int) -> dict:
    """One torchrun run of the small run in `trial_dir`, with `faults` injected as it goes."""
    from genfoundry.distributed.launch import RESTART_ENV, torchrun_command

    trial_dir.mkdir(parents=True)
    run_dir = trial_dir / "run"
    marker = trial_dir / "kill-in-write.marker"
    env = {**os.environ, "OMP_NUM_THREADS": "1", **RESTART_ENV}
    env.pop(FAULT_KILL_IN_WRITE, None)
    if faults and faults[0].kind == "in-write":
        env[FAULT_KILL_IN_WRITE] = f"{faults[0].step}:{faults[0].rank}:{marker}"
    command = torchrun_command(ranks, "genfoundry", ["train", "--config", config, *train_args,
                                                     f"--run.root={trial_dir}", "--run.name=run"], max_restarts)
    stdout, stderr = trial_dir / "torchrun.out", trial_dir / "torchrun.err"
    rows: list[dict] = []
    reason = ""
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        start = time.monotonic()
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.monotonic() - start > timeout_s:
                    reason = f"did not finish within {timeout_s:.0f} s (--trial-timeout)"
                    break
                rows = _read_rows(run_dir / "metrics.jsonl", rows)
                _inject(faults, rows, proc.pid, marker, steps, full_every)
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                kill_launch(proc.pid)
            proc.wait()
        wall_s = time.monotonic() - start
    rows = _read_rows(run_dir / "metrics.jsonl", rows)
    _settle(faults, rows, marker, steps)
    completed = proc.returncode == 0 and not reason
    result = {"completed": completed, "exit_code": proc.returncode, "wall_s": wall_s,
              "reason": reason or ("" if completed else f"torchrun exited with code {proc.returncode}"),
              "bit_exact": False, "mismatch": None, "faults": [asdict(f) for f in faults]}
    if not completed:
        result["log_tail"] = stderr.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
    return result


def _read_rows(path: Path, previous: list[dict]) -> list[dict]:
    """Every row of metrics.jsonl as written (a last line half written is left out), or `previous`
    while it is missing."""
    from genfoundry import metrics

    try:
        return metrics.read_jsonl(path, all_rows=True)
    except FileNotFoundError:
        return previous


def _attempt_step(rows: list[dict]) -> int | None:
    """The newest step of the current attempt: the rows after the last resume (or the resume's step)."""
    newest = None
    for row in rows:
        if row.get("event") == "resume":
            newest = row["step"]
        elif "event" not in row:
            newest = row["step"] if newest is None else max(newest, row["step"])
    return newest


def _measure_recoveries(faults: list[Fault], rows: list[dict]) -> None:
    for fault in faults:
        if not fault.injected or fault.recovery_s is not None:
            continue
        resume = None
        for row in rows:
            if resume is None and row.get("event") == "resume" and row["time"] >= fault.time:
                resume = row
            elif resume is not None and "event" not in row and row["step"] > resume["step"]:
                fault.recovery_s = row["time"] - fault.time
                break


def _settled(fault: Fault, rows: list[dict], full_every: int) -> bool:
    """Whether a fault is over, so that the next may strike: recovered, or (the in-write kill) not
    injected although the run has passed the next checkpoint, which waits for its write to end."""
    if fault.injected:
        return fault.recovery_s is not None
    if fault.kind == "in-write":
        return any("event" not in r and r["step"] > fault.step + full_every for r in rows)
    return False


def _inject(faults: list[Fault], rows: list[dict], torchrun_pid: int, marker: Path, steps: int,
            full_every: int) -> None:
    """One poll: notes the in-write kill once its marker appears, measures recoveries, and kills the
    worker of the next due fault once the ones before it are over."""
    if faults and faults[0].kind == "in-write" and not faults[0].injected and marker.exists():
        first = faults[0]
        first.injected, first.time, first.at_step = True, marker.stat().st_mtime, first.step
    _measure_recoveries(faults, rows)
    for i, fault in enumerate(faults):
        if fault.kind != "kill" or fault.injected:
            continue
        newest = _attempt_step(rows)
        if not all(_settled(f, rows, full_every) for f in faults[:i]) or newest is None:
            return
        if not fault.step <= newest < steps:  # not yet due, or the run is past its last step
            return
        pid = worker_pids(torchrun_pid).get(fault.rank)
        if pid is None:  # torchrun is between two sets of workers
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        fault.injected, fault.time, fault.at_step = True, time.time(), newest
        return


def _settle(faults: list[Fault], rows: list[dict], marker: Path, steps: int) -> None:
    """After the run: the in-write kill's final state, the last recoveries, and why the rest did not happen."""
    if faults and faults[0].kind == "in-write" and not faults[0].injected and marker.exists():
        faults[0].injected, faults[0].time, faults[0].at_step = True, marker.stat().st_mtime, faults[0].step
    _measure_recoveries(faults, rows)
    for fault in faults:
        if fault.kind == "in-write" and not fault.injected:
            fault.note = f"the checkpoint writer did not act on {FAULT_KILL_IN_WRITE}"
        elif not fault.injected:
            fault.note = (f"the run ended before it was due (at step {fault.step} of {steps}, once the fault "
                          f"before it had recovered)")
        elif fault.recovery_s is None:
            fault.note = "no step was logged after the restart that followed it"


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the worker processes torchrun has started (its children, from Linux's /proc)."""
    try:
        children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    except OSError:
        return {}
    pids = {}
    for child in children:
        try:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except OSError:  # it exited since
            continue
        rank = next((item[5:] for item in environ if item.startswith(b"RANK=")), None)
        if rank is not None:
            pids[int(rank)] = int(child)
    return pids


def kill_launch(torchrun_pid: int) -> None:
    """SIGKILL to torchrun's session and to each worker's: torchrun starts every worker in a session of
    its own, which would outlive it. torchrun is stopped first, so that it starts no worker meanwhile."""
    os.killpg(torchrun_pid, signal.SIGSTOP)
    for pid in worker_pids(torchrun_pid).values():
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(torchrun_pid, signal.SIGKILL)


def compare_final_weights(reference_run: Path, run_dir: Path) -> str | None:
    """None when RUN/final/{model,ema}.safetensors equal the reference's tensor for tensor, else what differs."""
    import torch
    from safetensors.torch import load_file

    for kind in ("model", "ema"):
        path = run_dir / "final" / f"{kind}.safetensors"
        if not path.is_file():
            return f"{path} is missing"
        ours, theirs = load_file(str(path)), load_file(str(reference_run / "final" / f"{kind}.safetensors"))
        if ours.keys() != theirs.keys():
            return f"{kind}: tensor names differ from the reference's"
        for name, tensor in ours.items():
            if not torch.equal(tensor, theirs[name]):
                if tensor.shape != theirs[name].shape or tensor.dtype != theirs[name].dtype:
                    return f"{kind}.{name}: shape or dtype differs from the reference's"
                gap = (tensor.double() - theirs[name].double()).abs().max().item()
                return f"{kind}.{name} differs from the reference (max |diff| {gap:.3g})"
    return None


def _trial_line(detail: dict, trials: int) -> str:
    faults = detail["faults"]
    said = ", ".join(f"{f['kind']} at step {f['step']} rank {f['rank']}{'' if f['injected'] else ' (not injected)'}"
                     for f in faults) or "none"
    recoveries = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
    recovery = f"{sum(recoveries) / len(recoveries):.1f} s" if recoveries else "n/a"
    if not detail["completed"]:
        verdict = f"not completed: {detail['reason']}"
    else:
        verdict = "bit-exact" if detail["bit_exact"] else f"NOT bit-exact: {detail['mismatch']}"
    injected = sum(f["injected"] for f in faults)
    return (f"trial {detail['trial'] + 1}/{trials}: faults {injected}/{len(faults)} injected ({said}), "
            f"recovery {recovery}, wall {detail['wall_s']:.1f} s, {verdict}")


def _summary(details: list[dict], reference: dict, **settings) -> dict:
    faults = [f for d in details for f in d["faults"]]
    recoveries = [f["recovery_s"] for f in faults if f["recovery_s"] is not None]
    return {
        "format_version": FORMAT_VERSION, **settings,
        "trials": len(details),
        "faults_planned": len(faults),
        "faults_injected": sum(f["injected"] for f in faults),
        "completed": sum(d["completed"] for d in details),
        "bit_exact": sum(d["bit_exact"] for d in details),
        "mean_recovery_s": sum(recoveries) / len(recoveries) if recoveries else None,
        "recoveries_measured": len(recoveries),
        "recovery_definition": RECOVERY_DEFINITION,
        "goodput": sum(d["goodput"] for d in details) / len(details),
        "goodput_definition": GOODPUT_DEFINITION,
        "reference_wall_s": reference["wall_s"],
        "trials_detail": details,
    }
