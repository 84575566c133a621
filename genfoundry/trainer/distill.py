"""Guidance distillation: the objective that teaches a student a finished run's guided velocity.

`distill.teacher` names the run. The student has the teacher's network and starts from its weights;
its target at x_t is the teacher's v_u + w(t) (v_c - v_u), with w(t) the guidance of the student's own
[sample] section (weight, schedule, interval). The student's model.json records that guidance as
folded in: sampling it runs one conditional pass per evaluation (`genfoundry.sampling.generate`), and
asking it for another guidance is an error rather than guidance applied twice.
"""

from __future__ import annotations

import torch

from genfoundry.config import Config
from genfoundry.diffusion.objective import GuidanceDistillation
from genfoundry.errors import ConfigError
from genfoundry.sampling.solvers import guidance_scale


def folded_guidance(cfg: Config) -> dict:
    """The guidance a student of `cfg` learns, as its model.json records it."""
    sc = cfg.sample
    return {"cfg_scale": sc.cfg_scale, "guidance_schedule": sc.guidance_schedule,
            "guidance_interval": [sc.guidance_min_t, sc.guidance_max_t]}


def load_teacher(cfg: Config, student: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The teacher of `cfg.distill`, frozen on `device`, and its model.json; `student` (built for this
    run's data) takes the teacher's weights. Errors name what differs between them."""
    from genfoundry import api

    try:
        teacher, meta = api.load_trained(cfg.distill.teacher, cfg.distill.weights, str(device),
                                         print_fn=lambda *a: None)
    except api.RunError as e:
        raise ConfigError(f"distill.teacher: {e}") from None
    if meta.get("folded_guidance"):
        raise ConfigError(f"distill.teacher '{cfg.distill.teacher}' is itself guidance-distilled (its guidance "
                          f"{meta['folded_guidance']} is folded in): distill from the run it was distilled from")
    if cfg.sample.cfg_scale == 1.0:
        raise ConfigError("distillation folds in the guidance of [sample]; sample.cfg_scale is 1 (no guidance), "
                          "so there is nothing to fold in: set it to the weight the student should give")
    theirs, ours = teacher.arch.to_dict(), student.arch.to_dict()
    if theirs != ours:
        differ = ", ".join(f"{k} {theirs[k]} (student {ours[k]})" for k in theirs if theirs[k] != ours.get(k))
        raise ConfigError(f"distill.teacher '{cfg.distill.teacher}' has another network than this run builds: {differ}; "
                          f"train the student with the teacher's model.preset ('{meta.get('preset')}') on the "
                          f"teacher's data")
    student.load_state_dict(teacher.state_dict())
    return teacher.eval().requires_grad_(False), meta


def distillation_objective(cfg: Config, teacher: torch.nn.Module, flow: dict) -> GuidanceDistillation:
    folded = folded_guidance(cfg)
    interval = tuple(folded["guidance_interval"])

    def weights(t: torch.Tensor) -> torch.Tensor:
        return guidance_scale(folded["cfg_scale"], folded["guidance_schedule"], t, interval)

    return GuidanceDistillation(teacher, weights, **flow)
