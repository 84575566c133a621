"""The checkpoint benchmark on a CPU: all three methods measured, figures written, files removed."""

import json
import os

import pytest
import torch

from genfoundry.bench import checkpoint as bench
from genfoundry.errors import ConfigError

TINY = dict(device="cpu", preset="DiT-T/4", image_size=8, batch_size=2, steps=7, every=2, warmup=1)


def test_three_methods_measured_and_cleaned_up(tmp_path):
    out = tmp_path / "out" / "checkpoint.json"
    work = tmp_path / "work"
    result = bench.run(**TINY, workdir=str(work), out=str(out), print_fn=lambda *a: None)
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))
    assert written["save_steps"] == [2, 4, 6]
    assert written["parameters"] == bench.count_parameters(bench.DiTArch(8, 1, 10, **bench.MODELS["DiT-T/4"]))
    # weights, two AdamW moments and the EMA, all fp32
    assert written["state_bytes"] >= 4 * 4 * written["parameters"]
    assert set(written["methods"]) == set(bench.METHODS)
    for name, m in written["methods"].items():
        assert m["saves"] == 3, name
        assert len(m["durable_s"]["each"]) == 3 and min(m["durable_s"]["each"]) > 0, name
        assert min(m["call_s"]["each"]) > 0 and m["step_s"] > 0, name
        assert m["durable_s"]["max"] >= m["durable_s"]["median"], name
    # a blocking torch.save is durable when its call returns, and training waits for all of it
    m = written["methods"]["torch_save"]
    assert m["durable_s"]["median"] <= m["call_s"]["median"]
    assert m["stall_s"]["median"] > 0
    assert set(written["ratios"]) == {"torch_save_over_genfoundry", "genfoundry_over_dcp_async", "dcp_async_compared"}
    assert all(isinstance(v, bool) for v in written["targets"].values()) and len(written["targets"]) == 2
    assert os.listdir(work) == []  # every method's checkpoints and the temporary directory are gone


def test_saves_what_the_trainer_saves(tmp_path):
    from genfoundry.checkpoint.manager import CheckpointManager

    run = bench.BenchRun(bench.DiTArch(8, 1, 10, **bench.MODELS["DiT-T/4"]), torch.device("cpu"), "fp32", 2)
    run.train_step(lambda: None)
    state = run.state_dict()
    assert {"model", "optimizer", "ema", "step", "rng", "data", "config_hash"} <= set(state)
    assert len(state["optimizer"]["state"]) == len(list(run.model.parameters()))  # the moments exist
    run.checkpoints = CheckpointManager(tmp_path, run.device, keep=1)
    run.save_checkpoint("full")
    run.checkpoints.close()
    saved = run.checkpoints.read(1)
    assert saved["step"] == 1 and torch.equal(saved["model"]["blocks.0.attn.qkv.weight"],
                                              state["model"]["blocks.0.attn.qkv.weight"])


def test_params_fits_the_depth():
    arch, _ = bench.resolve_arch(torch.device("cuda"), None, 1e9, None, None, None, None)
    n = bench.count_parameters(arch)
    per_block = 18 * arch.hidden_size**2  # a block's weights: attention 4 d^2, MLP 8 d^2, adaLN 6 d^2
    assert (arch.hidden_size, arch.num_heads, arch.image_size, arch.in_channels) == (2048, 16, 32, 4)
    assert abs(n - 1e9) < per_block / 2 + 1e7


@pytest.mark.parametrize("options, flag", [
    (dict(preset="DiT-T/4", params=1e9), "--preset"),
    (dict(arch="2048,13"), "--arch"),
    (dict(steps=3, every=5), "--every"),
    (dict(methods=["torch_save", "pickle"]), "--methods"),
    (dict(preset="DiT-T/8", image_size=28), "--image-size"),
    (dict(precision="fp16"), "--precision"),
])
def test_bad_options_name_the_flag(options, flag, tmp_path):
    with pytest.raises(ConfigError, match=flag):
        bench.run(**{**TINY, **options}, workdir=str(tmp_path), print_fn=lambda *a: None)
