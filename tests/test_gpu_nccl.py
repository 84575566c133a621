"""The real trainer inside a one-rank NCCL process group: NCCL takes only device tensors, where gloo
forgives host ones, so every collective the trainer, metrics and hooks issue is checked here.
They skip, with the reason, on machines without CUDA."""

import json

import numpy as np
import pytest
import torch

from multiproc import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch.distributed.is_nccl_available(),
                                reason="needs a CUDA device and NCCL")

QUIET = lambda *a, **k: None  # noqa: E731


def _image_folder(root) -> str:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(24):
            image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / "images" / label / f"{i}.png")
    return str(root / "images")


def _cfg(root, source, name, **overrides):
    from genfoundry import config

    base = {"data.source": source, "data.resolution": 16, "data.channels": 3, "train.global_batch_size": 16,
            "train.val_batch_size": 16, "train.log_every": 1, "train.val_every": 2, "train.sample_every": 0,
            "checkpoint.full_every": 2, "train.warmup_steps": 1, "sample.steps": 2, "sample.per_class": 1,
            "run.root": str(root), "run.name": name}
    return config.load("demo", {**base, **overrides})


SCENARIOS = {
    # name: overrides; each trains to 4 steps at once, and to 2 then resumed to 4
    "ddp-topk-fp16": {"parallel.strategy": "ddp", "parallel.comm_hook": "topk", "parallel.topk_ratio": 0.05,
                      "parallel.topk_warmup_steps": 0, "train.precision": "fp16",
                      "train.loss_scale_init": 4194304, "train.fp16_max_overflows": 10},
    "ddp-powersgd-bf16": {"parallel.strategy": "ddp", "parallel.comm_hook": "powersgd",
                          "parallel.powersgd_rank": 2, "parallel.powersgd_warmup_steps": 2,
                          "train.precision": "bf16"},
    "fsdp-bf16": {"parallel.strategy": "fsdp", "train.precision": "bf16"},
    "ddp-auto-micro": {"parallel.strategy": "ddp", "train.micro_batch_size": 0},
    # full states gathered from FSDP2, EMA snapshots every step, uploads to a remote directory
    "fsdp-full-remote": {"parallel.strategy": "fsdp", "checkpoint.sharded": "full", "checkpoint.snapshot_every": 1,
                         "checkpoint.remote": "file://{root}/remote-{name}"},
    "ddp-synchronous": {"parallel.strategy": "ddp", "checkpoint.asynchronous": "false"},
    # the budget's clock agreed over NCCL each report; the fused optimizer skips on the device
    "ddp-budget-wsd": {"parallel.strategy": "ddp", "train.time_budget_s": 3600, "train.lr_schedule": "wsd"},
    # guidance distillation from a run above: the teacher's two passes inside the compiled loss, and sharded
    "distill-ddp-graphs": {"parallel.strategy": "ddp", "train.precision": "bf16", "parallel.compile": True,
                           "parallel.compile_scope": "loss", "parallel.cuda_graphs": True,
                           "distill.teacher": "{root}/ddp-synchronous", "distill.weights": "model"},
    "distill-fsdp": {"parallel.strategy": "fsdp", "train.precision": "bf16",
                     "distill.teacher": "{root}/ddp-synchronous", "distill.weights": "ema"},
}


def _nccl_rank(rank, world_size, root, out):
    from safetensors.torch import load_file

    from genfoundry import accel, metrics
    from genfoundry.api import train

    result = {"comm_device": str(accel.comm_device())}
    metrics.report("x", torch.tensor(2.0, device=accel.get_device()))
    metrics.report("y", 3.0)
    metrics.report("z", torch.tensor(4.0, device=accel.get_device()), spread=True)
    result["collect"] = metrics.collect()
    result["broadcast"] = accel.broadcast_int(7)
    source = _image_folder(root)
    for name, overrides in SCENARIOS.items():
        overrides = {k: v.format(root=root, name=name) if isinstance(v, str) else v for k, v in overrides.items()}
        train(_cfg(root, source, name, **{**overrides, "train.steps": 4}), QUIET)
        train(_cfg(root, source, name + "-split", **{**overrides, "train.steps": 2}), QUIET)
        train(_cfg(root, source, name + "-split", **{**overrides, "train.steps": 4}), QUIET)
        rows = metrics.read_jsonl(root / name / "metrics.jsonl")
        whole = load_file(str(root / name / "final" / "model.safetensors"))
        split = load_file(str(root / (name + "-split") / "final" / "model.safetensors"))
        result[name] = {
            "rows": rows,
            "finite": all(bool(torch.isfinite(v).all()) for v in whole.values()),
            "resume_gap": max((whole[k].float() - split[k].float()).abs().max().item() for k in whole),
            "checkpoints": sorted(p.name for p in (root / name / "checkpoints").iterdir()),
            "report": (root / name / "report.html").is_file(),
            "tensorboard": len(list((root / name).glob("events.out.tfevents.*"))),
            "folded_guidance": json.loads((root / name / "final" / "model.json").read_text()).get("folded_guidance"),
        }
    result["remote"] = sorted(p.name for p in (root / "remote-fsdp-full-remote").iterdir())
    from genfoundry.report.assets import AssetError, uplot

    try:  # without its chart library (setup.sh installs it) the trainer warns and writes no page
        uplot()
        result["has_uplot"] = True
    except AssetError:
        result["has_uplot"] = False
    try:
        import tensorboard  # noqa: F401
        result["has_tensorboard"] = True
    except ImportError:
        result["has_tensorboard"] = False
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f)


@pytest.mark.timeout(600)
def test_the_trainer_runs_and_resumes_in_a_one_rank_nccl_group(tmp_path):
    run_ranks(_nccl_rank, 1, tmp_path, str(tmp_path), timeout=540, backend="nccl")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["comm_device"] == "cuda:0"
    assert result["collect"] == {"x": 2.0, "y": 3.0, "z": 4.0, "z.min": 4.0, "z.max": 4.0} and result["broadcast"] == 7
    for name in SCENARIOS:
        got = result[name]
        last = got["rows"][-1]
        assert got["finite"] and last["step"] == 4 and last["loss"] is not None and "val_loss" in last, (name, last)
        assert got["resume_gap"] < 1e-4, (name, got["resume_gap"])
        # in a process group, spread metrics carry the ranks' extremes; memory is the CUDA allocator's
        assert last["data/wait_fraction.min"] <= last["data/wait_fraction"] <= last["data/wait_fraction.max"]
        assert 0 < last["memory_allocated_gb"] <= last["peak_memory_gb"] < 100, (name, last)
        assert got["report"] == result["has_uplot"], name
        assert got["tensorboard"] == (1 if result["has_tensorboard"] else 0), name
    for name in SCENARIOS:  # a student's model.json says its guidance is folded in, a teacher's says none
        folded = result[name]["folded_guidance"]
        assert (folded is not None) == name.startswith("distill") and (folded is None or folded["cfg_scale"] == 3.0)
    assert result["fsdp-bf16"]["checkpoints"] == ["full-000000002", "full-000000004"]
    snapshots = ["snapshot-000000002", "snapshot-000000003", "snapshot-000000004"]
    assert result["fsdp-full-remote"]["checkpoints"] == ["full-000000002", "full-000000004", *snapshots]
    assert result["remote"] == ["full-000000002", "full-000000004", "snapshot-000000003", "snapshot-000000004"]
    fp16 = result["ddp-topk-fp16"]["rows"]
    assert any(r.get("skipped_steps") is not None for r in fp16)  # the loss scaler ran, flags agreed over NCCL
    assert not any(r.get("precision_fallback") for r in fp16)
    # One rank sends nothing, but the hooks ran and counted: the dense equivalent is 0 bytes too.
    assert result["ddp-powersgd-bf16"]["rows"][-1]["comm/dense_bytes_per_step"] == 0
