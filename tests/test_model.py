import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from genfoundry.models import MODELS, build_model


@pytest.mark.parametrize("preset,size,channels", [("DiT-T/4", 28, 1), ("DiT-S/2", 16, 4), ("DiT-T/2", 32, 3)])
def test_output_shape_matches_input(preset, size, channels):
    model = build_model(preset, size, channels, num_classes=10)
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.rand(3), torch.tensor([0, 5, 9]))
    assert out.shape == x.shape


def test_adaln_zero_starts_at_zero_output():
    model = build_model("DiT-T/4", 28, 1, 10)
    assert model(torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])).abs().max() == 0


def test_label_drop_uses_null_class():
    model = build_model("DiT-T/4", 28, 1, 10)
    torch.nn.init.normal_(model.final_layer.linear.weight)  # make the output depend on the label
    for block in model.blocks:
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.02)
    torch.nn.init.normal_(model.final_layer.adaLN_modulation[-1].weight, std=0.02)
    x, t = torch.randn(2, 1, 28, 28), torch.rand(2)
    dropped = model(x, t, torch.tensor([3, 4]), drop=torch.tensor([True, True]))
    null = model(x, t, torch.tensor([10, 10]))
    kept = model(x, t, torch.tensor([3, 4]))
    torch.testing.assert_close(dropped, null)
    assert not torch.allclose(dropped, kept)


@pytest.mark.parametrize("preset,size,channels", [("DiT-T/4", 28, 1), ("DiT-B/2", 32, 4)])
def test_flops_match_counted_operations(preset, size, channels):
    """The analytic count equals torch's counter plus the attention products it does not see on CPU."""
    model = build_model(preset, size, channels, num_classes=10)
    x = torch.randn(1, channels, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x, torch.rand(1), torch.tensor([0]))
    a = model.arch
    attention = 2 * 2 * a.num_tokens**2 * a.hidden_size * a.depth  # q k^T and p v, FLOPs = 2 x MACs
    counted = counter.get_total_flops()
    assert model.flops_per_forward() in (counted, counted + attention)


def test_registry_has_standard_presets_and_rejects_unknown():
    for name in ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"):
        assert name in MODELS
    assert MODELS["DiT-XL/2"]["hidden_size"] == 1152 and MODELS["DiT-XL/2"]["depth"] == 28
    with pytest.raises(ValueError, match="unknown model preset"):
        build_model("DiT-Q/3", 32, 4, 10)


def test_dit_xl2_flops_match_paper():
    """Peebles & Xie report 118.6 GFLOPs (multiply-adds) for DiT-XL/2 at 256x256 (32x32x4 latents)."""
    with torch.device("meta"):  # the count needs the shapes only, not 675 M initialised weights
        model_macs = build_model("DiT-XL/2", 32, 4, 1000).flops_per_forward() / 2
    assert abs(model_macs / 1e9 - 118.6) / 118.6 < 0.01
