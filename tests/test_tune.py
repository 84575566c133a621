"""genfoundry tune end to end, with real trials on a tiny image folder, a real SQLite study and real
processes: a study completes and resumes to nothing, its best config trains, a typo is one error,
hopeless trials are pruned, two processes share one study, and a trial killed with kill -9 is taken
over and resumes its run directory."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from genfoundry import cli, config, metrics
from genfoundry.config import ConfigError
from genfoundry.tuning import TuneError, open_storage, tune

from conftest import ROOT, run_cli

QUIET = lambda *a, **k: None  # noqa: E731
# A trial of about a second on two cores: 20 steps of 16 images of 16x16 pixels, validated at 10 and 20.
TINY = {"train.steps": 20, "train.global_batch_size": 16, "train.val_every": 10, "train.log_every": 10,
        "train.sample_every": 0, "train.report_every": 0, "train.tensorboard": False, "checkpoint.full_every": 10,
        "data.holdout": 0.2, "sample.steps": 2, "sample.per_class": 1, "run.threads": 1}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """80 PNGs of 16x16 in two class folders: a horizontal bar, or a vertical one, somewhere."""
    root = tmp_path_factory.mktemp("bars")
    rng = np.random.default_rng(0)
    for c in ("rows", "columns"):
        (root / c).mkdir()
        for i in range(40):
            a = np.zeros((16, 16), np.uint8)
            k = int(rng.integers(2, 14))
            if c == "rows":
                a[k - 1:k + 1, :] = 255
            else:
                a[:, k - 1:k + 1] = 255
            Image.fromarray(a).save(root / c / f"{i:02d}.png")
    return root


def tiny(root, images, **more) -> dict:
    return {**TINY, "run.root": str(root), "data.source": str(images), **more}


def args_of(overrides: dict) -> list[str]:
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()]


def trials_of(study_dir) -> dict:
    return json.loads((study_dir / "trials.json").read_text())


def finished(summary: dict) -> list[dict]:
    return [t for t in summary["trials"] if t["state"] in ("COMPLETE", "PRUNED")]


def test_a_study_completes_writes_its_results_and_resumes_to_nothing(tmp_path, images):
    space = tmp_path / "space.toml"
    space.write_text('[search]\n"train.ema_halflife_kimg" = { low = 0.5, high = 20 }\n'
                     '[search.diffusion]\ntime_sampling = ["uniform", "logit-normal"]\n')
    command = ["tune", "--study", "s", "--trials", "3", "--space", space, "--search", "train.lr=log:1e-4:3e-3",
               "--search", "train.warmup_steps=int:0:10", "--heartbeat-s", "2", *args_of(tiny(tmp_path, images))]
    r = run_cli(*command)
    assert r.returncode == 0, r.stderr
    study = tmp_path / "s"
    summary = trials_of(study)
    assert summary["counts"]["COMPLETE"] == 3 and len(summary["trials"]) == 3
    assert list(summary["search"]) == ["train.ema_halflife_kimg", "diffusion.time_sampling", "train.lr",
                                       "train.warmup_steps"]
    for t in summary["trials"]:
        p = t["params"]
        assert 0.5 <= p["train.ema_halflife_kimg"] <= 20 and 1e-4 <= p["train.lr"] <= 3e-3
        assert isinstance(p["train.warmup_steps"], int) and 0 <= p["train.warmup_steps"] <= 10
        assert p["diffusion.time_sampling"] in ("uniform", "logit-normal")
        assert t["run_dir"] == str(study / f"trial-{t['number']:04d}") and t["duration_s"] > 0
        final = json.loads((study / f"trial-{t['number']:04d}" / "final" / "model.json").read_text())
        assert t["value"] == min(final["val_loss"], final["val_loss_ema"])  # the default metric
        trained = config.load(str(study / f"trial-{t['number']:04d}" / "config.toml"))
        assert trained.train.lr == p["train.lr"] and trained.diffusion.time_sampling == p["diffusion.time_sampling"]
        assert [s for s, _ in t["intermediate"]] == [10, 20]
    best = min(summary["trials"], key=lambda t: t["value"])
    assert summary["best"]["number"] == best["number"]

    # best.toml: a recipe of the best trial's resolved config, with a header saying what it is
    text = (study / "best.toml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "study 's'" in header[0] and f"trial {best['number']}: val_loss" in header[1]
    cfg = config.load(str(study / "best.toml"))
    assert cfg.train.lr == best["params"]["train.lr"] and cfg.run.name == f"s/trial-{best['number']:04d}"
    assert f"genfoundry train --config {study / 'best.toml'} --run.name=s-best" in r.stdout
    assert f'time_sampling = "{best["params"]["diffusion.time_sampling"]}"' in r.stdout  # printed as TOML
    assert cli.main(["train", "--config", str(study / "best.toml"), "--dry-run"]) == 0

    # the study's page: every trial in the table, the best one marked, the runs' curves drawn
    page = (study / "report.html").read_text()
    assert "Trials of study s" in page and page.count("<tr class=") == 3
    assert f"<tr class='best complete' data-trial={best['number']}>" in page
    assert "href='trial-0000/report.html'" in page
    data = json.loads(page.split("id=report-data>", 1)[1].split("</script>", 1)[0])
    assert sorted(r["name"] for r in data["runs"]) == ["trial-0000", "trial-0001", "trial-0002"]
    try:
        from genfoundry.report.browser import BrowserError, find_browser, open_page

        find_browser()
    except (ImportError, BrowserError) as e:
        pytest.skip(f"headless Chromium unavailable: {e}")
    seen = open_page(study / "report.html")
    assert seen["console_errors"] == [] and seen["status"]["errors"] == []
    charts = {c["id"]: c for c in seen["status"]["charts"]}
    assert charts["chart-loss"]["series"] == 3 * 4 and charts["chart-loss"]["drawn"]  # 3 runs, each as in a report

    # the same command again: the study has its trials, nothing runs
    before = sorted(p.name for p in study.iterdir())
    again = run_cli(*command)
    assert again.returncode == 0, again.stderr
    assert "nothing to run" in again.stdout and "trial 3" not in again.stdout
    assert len(trials_of(study)["trials"]) == 3 and sorted(p.name for p in study.iterdir()) == before
    # `genfoundry report STUDY_DIR` rebuilds the page
    rebuilt = run_cli("report", study)
    assert rebuilt.returncode == 0 and f"report: {study / 'report.html'}" in rebuilt.stdout


def test_search_mistakes_are_one_error_before_any_trial(tmp_path, images):
    base = tiny(tmp_path, images)
    for search, message in (
            ({"train.lrr": "log:1e-4:1e-3"}, "search: unknown config key 'train.lrr'; did you mean 'train.lr'?"),
            ({"train.lr": "log:0:1e-3"}, "search train.lr='log:0:1e-3': a log range needs a low end above 0"),
            ({"train.lr": "1e-3:1e-4"}, "the low end must be below the high end"),
            ({"train.lr": "3e-4"}, "expected log:LO:HI, LO:HI, int:LO:HI or choice:A,B,..."),
            ({"train.warmup_steps": "int:0:2.5"}, "the high end of an integer range must be an integer"),
            ({"train.beta1": "0.5:1.0"}, "search train.beta1='0.5:1.0': 1.0 is not accepted: train.beta1 must be in"),
            ({"diffusion.time_sampling": "choice:uniform,logit-normall"},
             "'logit-normall' is not one of"),
            ({"diffusion.time_sampling": "uniform:logit-normal"}, "a text key takes a choice"),
            ({"data.hflip": "choice:true,maybe"}, "data.hflip must be true or false, got 'maybe'"),
            ({"run.name": "choice:a,b"}, "run.name cannot be searched"),
            ({"train.steps": "int:10:20"}, "train.steps is both fixed"),
            ({}, "nothing to search")):
        with pytest.raises(ConfigError) as e:
            tune("bad", 2, search, overrides=base, print_fn=QUIET)
        assert message in str(e.value) and "\n" not in str(e.value), (search, str(e.value))
    with pytest.raises(ConfigError, match="enqueue: train.lr=1 is outside its search space log:0.0001:0.001"):
        tune("bad", 2, {"train.lr": "log:1e-4:1e-3"}, enqueue=["train.lr=1"], overrides=base, print_fn=QUIET)
    assert not (tmp_path / "bad").exists()  # nothing started

    r = run_cli("tune", "--study", "bad", "--search", "train.lrr=log:1e-4:1e-3", *args_of(base))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [
        "genfoundry tune: error: search: unknown config key 'train.lrr'; did you mean 'train.lr'?"]
    assert not (tmp_path / "bad").exists()


def test_a_hopeless_trial_is_pruned_at_its_first_validation(tmp_path, images):
    base = tiny(tmp_path, images, **{"train.warmup_steps": 0})
    queue = [{"train.lr": 2e-3}, {"train.lr": 1.5e-3}, {"train.lr": 1e-8}]  # the last can learn nothing
    summary = tune("p", 3, {"train.lr": "log:1e-8:1e-2"}, overrides=base, enqueue=queue, prune_startup_trials=2,
                   print_fn=QUIET)
    trials = {t["params"]["train.lr"]: t for t in summary["trials"]}
    assert trials[2e-3]["state"] == trials[1.5e-3]["state"] == "COMPLETE"
    hopeless = trials[1e-8]
    assert hopeless["state"] == "PRUNED" and hopeless["pruned_at_step"] == 10 and hopeless["value"] is None
    assert hopeless["intermediate"][0][1] > max(trials[2e-3]["intermediate"][0][1],
                                                trials[1.5e-3]["intermediate"][0][1])
    run = tmp_path / "p" / f"trial-{hopeless['number']:04d}"
    assert [r["step"] for r in metrics.read_jsonl(run / "metrics.jsonl")] == [0, 10]  # stopped there
    assert not (run / "final").exists()
    assert summary["best"]["params"]["train.lr"] in (2e-3, 1.5e-3)
    page = (tmp_path / "p" / "report.html").read_text()
    assert "pruned at step 10" in page
    assert summary["counts"] == {"COMPLETE": 2, "PRUNED": 1, "FAIL": 0, "RUNNING": 0, "WAITING": 0}

    # without a pruner the same trial runs to its end: it is the pruner that stopped it
    alone = tune("q", 1, {"train.lr": "log:1e-8:1e-2"}, overrides=base, enqueue=["train.lr=1e-8"], pruner="none",
                 print_fn=QUIET)
    assert [t["state"] for t in alone["trials"]] == ["COMPLETE"]


def _popen(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "genfoundry", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_processes_share_one_study(tmp_path, images):
    command = ["tune", "--study", "shared", "--trials", "4", "--search", "train.lr=log:1e-4:3e-3", "--pruner",
               "none", "--heartbeat-s", "1", *args_of(tiny(tmp_path, images))]
    procs = [_popen(*command, "--sampler-seed", seed) for seed in (1, 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    summary = trials_of(tmp_path / "shared")
    done = finished(summary)
    assert len(done) == 4 and all(t["state"] == "COMPLETE" for t in done)
    assert len({t["run_dir"] for t in done}) == 4
    # a trial asked for at the same moment as the last free one is given up unrun, never trained
    for t in summary["trials"]:
        if t["state"] == "FAIL":
            assert "not run" in t["error"] and not os.path.exists(t["run_dir"] or "/nonexistent")
    ran = [sum(line.startswith("trial ") and "->" in line for line in out.splitlines()) for out, _ in outs]
    assert sum(ran) == 4, ran


def test_a_killed_trial_is_taken_over_and_resumes_its_run_directory(tmp_path, images):
    base = tiny(tmp_path, images, **{"train.steps": 40})
    command = ["tune", "--study", "k", "--trials", "2", "--search", "train.lr=log:1e-4:3e-3", "--heartbeat-s", "1",
               *args_of(base)]
    run = tmp_path / "k" / "trial-0000"
    proc = _popen(*command)
    try:
        deadline = time.monotonic() + 60
        while not (run / "checkpoints" / "full-000000010").is_dir() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of trial 0: a checkpoint at step 10, 30 steps to go
    finally:
        proc.kill()
        proc.communicate()
    assert (run / "checkpoints" / "full-000000010").is_dir() and not (run / "final").exists()

    r = run_cli(*command)  # the same command again
    assert r.returncode == 0, r.stderr
    summary = trials_of(tmp_path / "k")
    by_number = {t["number"]: t for t in summary["trials"]}
    assert by_number[0]["state"] == "FAIL"  # its heartbeat stopped
    retried = [t for t in summary["trials"] if t["retry_of"] == 0]
    assert len(retried) == 1 and retried[0]["state"] == "COMPLETE" and retried[0]["run_dir"] == str(run)
    assert retried[0]["params"] == by_number[0]["params"]
    assert len(finished(summary)) == 2 and summary["counts"]["COMPLETE"] == 2
    resumes = [e for e in metrics.read_jsonl(run / "metrics.jsonl", all_rows=True) if e.get("event") == "resume"]
    assert len(resumes) == 1 and resumes[0]["step"] >= 10  # from its checkpoint, not from the start
    assert [s for s, _ in retried[0]["intermediate"]][:1] == [10]  # the values before the kill are kept
    assert "(trial 0 again: it stopped before it finished)" in r.stdout
    assert by_number[0]["error"] == ("stopped before it finished (its process died or was interrupted); run again "
                                     f"as trial {retried[0]['number']}")


def test_fid_scores_the_finished_trial(tmp_path, images):
    base = tiny(tmp_path, images, **{"eval.max_reference_images": 16})
    summary = tune("f", 1, {"train.lr": "log:1e-4:3e-3"}, overrides=base, metric="fid", fid_samples=8,
                   pruner="hyperband", print_fn=QUIET)
    [trial] = summary["trials"]
    scored = json.loads((tmp_path / "f" / "trial-0000" / "eval" / "fid-8.json").read_text())
    assert trial["state"] == "COMPLETE" and trial["value"] == scored["fid"] == trial["fid"] > 0
    assert summary["metric"] == "fid" and "fid" in (tmp_path / "f" / "best.toml").read_text().splitlines()[1]
    with pytest.raises(TuneError, match="scores trials by --metric fid, not val_loss"):
        tune("f", 2, {"train.lr": "log:1e-4:3e-3"}, overrides=base, print_fn=QUIET)
    with pytest.raises(TuneError, match=r"searches another space \(--search train.lr=log:0.0001:0.003\)"):
        tune("f", 2, {"train.lr": "log:1e-4:1e-3"}, overrides=base, metric="fid", print_fn=QUIET)
    with pytest.raises(TuneError, match="other settings of train.steps; continue it with --train.steps=20"):
        tune("f", 2, {"train.lr": "log:1e-4:3e-3"}, overrides={**base, "train.steps": 30}, metric="fid",
             print_fn=QUIET)


RACE = """
import sys
import optuna
from genfoundry import config
from genfoundry.tuning import TuneError, build_space, open_storage, open_study

optuna.logging.set_verbosity(optuna.logging.ERROR)
db, _ = open_storage(sys.argv[1], 60)
base = config.load(None, {"train.steps": int(sys.argv[2])})
params, _ = build_space(base, {"train.lr": "log:1e-4:3e-3"})
failed = []
for i in range(25):
    try:
        open_study(db, f"s{i}", "val_loss", params, base)
    except TuneError:
        failed.append(i)
print(" ".join(map(str, failed)))
"""


@pytest.mark.parametrize("steps", [(20, 20), (20, 30)], ids=["same", "other"])
def test_first_commands_that_race_agree_on_one_record(tmp_path, steps):
    """Two processes start the same 25 studies at once. With the same settings neither ever reads a
    half-written record; with other settings exactly one of the two fails on each study."""
    url = f"sqlite:///{tmp_path / 'race.db'}"
    open_storage(url, 60)  # the tables, made once
    procs = [subprocess.Popen([sys.executable, "-c", RACE, url, str(s)], stdout=subprocess.PIPE, text=True,
                              stderr=subprocess.PIPE, cwd=ROOT) for s in steps]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outs]
    failed = [set(map(int, out.split())) for out, _ in outs]
    if steps[0] == steps[1]:
        assert failed == [set(), set()]
    else:
        assert failed[0] | failed[1] == set(range(25)) and not failed[0] & failed[1]
