"""Guidance distillation: the target is the teacher's guided velocity, a real student learns it, its
model.json says its guidance is folded in, and sampling it runs one conditional pass per evaluation."""

import json
import math

import pytest
import torch

from genfoundry import api, config, metrics
from genfoundry.diffusion.objective import GuidanceDistillation
from genfoundry.errors import ConfigError
from genfoundry.models import build_model
from genfoundry.sampling import generate
from genfoundry.sampling.solvers import GUIDANCE_SCHEDULES, guidance_scale

QUIET = lambda *a, **k: None  # noqa: E731
TINY = {"train.global_batch_size": 16, "train.val_batch_size": 32, "train.log_every": 5, "train.val_every": 5,
        "train.sample_every": 0, "train.warmup_steps": 1, "checkpoint.full_every": 0, "sample.steps": 2,
        "sample.per_class": 1, "run.threads": 2, "train.tensorboard": "false", "train.report_every": 0}


def _net(seed=0):
    torch.manual_seed(seed)
    m = build_model("DiT-T/4", 28, 1, 10)
    for p in m.parameters():  # off the adaLN-Zero start, so that cond and uncond differ
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


@pytest.mark.parametrize("schedule", list(GUIDANCE_SCHEDULES))
def test_tensor_guidance_weights_are_the_scalar_ones(schedule):
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    got = guidance_scale(2.5, schedule, t, (0.2, 0.7))
    want = [guidance_scale(2.5, schedule, float(v), (0.2, 0.7)) for v in t]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))


def test_target_is_the_teachers_guided_velocity_and_dropped_labels_get_its_unconditional():
    teacher = _net()
    objective = GuidanceDistillation(teacher, lambda t: 1.0 + 2.0 * t, class_dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 1, 28, 28, generator=gen), torch.randn(6, 1, 28, 28, generator=gen)
    t, y = torch.rand(6, generator=gen), torch.tensor([0, 1, 2, 3, 4, 5])
    drop = torch.tensor([False, False, True, False, True, False])
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    with torch.no_grad():
        cond, uncond = teacher(xt, t, y), teacher(xt, t, y, torch.ones(6, dtype=torch.bool))
    want = uncond + (1.0 + 2.0 * t).view(-1, 1, 1, 1) * (cond - uncond)
    want[drop] = uncond[drop]
    got = objective.target(xt, t, y, x0, eps, drop)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (cond - uncond).abs().mean() > 1e-3  # the two halves differ, so the check means something


def test_a_folded_network_samples_in_one_pass_and_refuses_another_guidance():
    net = _net()
    net.folded_guidance = {"cfg_scale": 2.0, "guidance_schedule": "constant", "guidance_interval": [0.0, 1.0]}
    batches = []
    hook = net.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    labels = torch.arange(4)
    folded = generate(net, labels, range(4), steps=3, sampler="euler", cfg_scale=2.0, batch_size=4, progress=False)
    hook.remove()
    assert batches == [4, 4, 3 * 0 + 4]  # three evaluations of the 4 images, no unconditional half
    net.folded_guidance = None
    plain = generate(net, labels, range(4), steps=3, sampler="euler", cfg_scale=1.0, batch_size=4, progress=False)
    assert torch.equal(folded, plain)  # the one pass is the network's conditional velocity
    net.folded_guidance = {"cfg_scale": 2.0, "guidance_schedule": "constant", "guidance_interval": [0.0, 1.0]}
    with pytest.raises(ConfigError, match="guidance-distilled.*cfg_scale 2"):
        generate(net, labels, range(4), steps=3, cfg_scale=3.0, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    cfg = config.load("demo", {**TINY, "run.root": str(root), "run.name": "teacher", "train.steps": 30})
    api.train(cfg, QUIET)
    return root


def test_a_student_learns_the_guided_velocity_and_samples_as_its_run_says(teacher_run, tmp_path):
    cfg = config.load("demo", {**TINY, "run.root": str(teacher_run), "run.name": "student", "train.steps": 40,
                               "distill.teacher": str(teacher_run / "teacher"), "distill.weights": "model",
                               "train.lr": 2e-4, "train.warmup_steps": 5})
    lines = []
    api.train(cfg, lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any(line.startswith("distill: from") and "cfg_scale 3" in line for line in lines), lines
    meta = json.loads((teacher_run / "student" / "final" / "model.json").read_text())
    assert meta["folded_guidance"] == {"cfg_scale": 3.0, "guidance_schedule": "constant",
                                       "guidance_interval": [0.0, 1.0]}
    assert meta["distilled_from"] == {"run": str(teacher_run / "teacher"), "weights": "model", "step": 30,
                                      "preset": "DiT-T/4"}
    student, _ = api.load_trained(teacher_run / "student", "model", "cpu", QUIET)
    assert student.folded_guidance == meta["folded_guidance"]
    # The validation loss is the student's distance from the guided target on held-out images: at step 0
    # the student is the teacher (its conditional velocity alone), and it learns from there.
    rows = [r for r in metrics.read_jsonl(teacher_run / "student" / "metrics.jsonl") if "val_loss" in r]
    first, last = rows[0], rows[-1]
    assert first["step"] == 0 and last["step"] == 40
    assert math.isfinite(last["val_loss"]) and last["val_loss"] < 0.5 * first["val_loss"], rows
    info = api.sample(teacher_run / "student", tmp_path / "s", 10, device="cpu", weights="model")
    assert info["num_images"] == 10
    with pytest.raises(ConfigError, match="guidance-distilled"):
        api.sample(teacher_run / "student", tmp_path / "s2", 10, device="cpu", cfg_scale=1.5)


def test_bad_teachers_are_one_clear_error(teacher_run, tmp_path):
    base = {**TINY, "run.root": str(tmp_path), "train.steps": 2}
    cases = [({"distill.teacher": str(tmp_path / "missing")}, "distill.teacher: .*has no final model"),
             ({"distill.teacher": str(teacher_run / "teacher"), "model.preset": "DiT-S/4"},
              "has another network.*hidden_size 128 \\(student 384\\).*'DiT-T/4'"),
             ({"distill.teacher": str(teacher_run / "teacher"), "sample.cfg_scale": 1.0}, "nothing to fold in")]
    for overrides, match in cases:
        with pytest.raises(ConfigError, match=match):
            api.train(config.load("demo", {**base, "run.name": "bad", **overrides}), QUIET)
    with pytest.raises(ConfigError, match="distill.weights"):
        config.load("demo", {"distill.weights": "best"})


def _student_rank(rank, world_size, overrides):
    api.train(config.load("demo", overrides), QUIET)


@pytest.mark.timeout(300)
def test_a_student_on_two_ranks_learns_what_it_learns_on_one(teacher_run, tmp_path):
    from safetensors.torch import load_file

    from multiproc import run_ranks

    base = {**TINY, "run.root": str(tmp_path), "train.steps": 3, "train.grad_clip": 0.0, "train.lr": 2e-4,
            "distill.teacher": str(teacher_run / "teacher"), "distill.weights": "model", "train.global_batch_size": 8}
    api.train(config.load("demo", {**base, "run.name": "one"}), QUIET)
    run_ranks(_student_rank, 2, {**base, "run.name": "two"}, timeout=240)
    for kind in ("model", "ema"):
        one, two = (load_file(str(tmp_path / name / "final" / f"{kind}.safetensors")) for name in ("one", "two"))
        for key in one:
            torch.testing.assert_close(one[key], two[key], rtol=1e-4, atol=2e-5, msg=f"{kind}.{key}")
    meta = json.loads((tmp_path / "two" / "final" / "model.json").read_text())
    assert meta["folded_guidance"]["cfg_scale"] == 3.0
