import pytest
import torch

from genfoundry.sampling import generate, grid, image_noise, solve
from genfoundry.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("DiT-T/4", 28, 1, 10)
    for p in m.parameters():  # leave the adaLN-Zero start, so that the sampler has something to integrate
        torch.nn.init.normal_(p, std=0.05)
    return m.eval()


def test_noise_depends_only_on_seed_and_index():
    full = image_noise(range(6), (1, 4, 4), seed=3)
    torch.testing.assert_close(image_noise([4, 2], (1, 4, 4), seed=3), full[[4, 2]], rtol=0, atol=0)
    assert not torch.equal(image_noise([0], (1, 4, 4), seed=4), full[:1])


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_image_does_not_depend_on_batch_size(model, sampler):
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    one_batch = generate(model, labels, range(6), seed=1, steps=3, sampler=sampler, cfg_scale=2.0, batch_size=6)
    small_batches = generate(model, labels, range(6), seed=1, steps=3, sampler=sampler, cfg_scale=2.0, batch_size=4)
    # Another "process" producing only images 3..5 gets the same images.
    tail = generate(model, labels[3:], range(3, 6), seed=1, steps=3, sampler=sampler, cfg_scale=2.0, batch_size=1)
    assert one_batch.dtype == torch.uint8 and one_batch.shape == (6, 28, 28, 1)
    assert (one_batch.int() - small_batches.int()).abs().max() <= 1  # rounding at the uint8 boundary only
    assert (one_batch[3:].int() - tail.int()).abs().max() <= 1
    assert one_batch.float().std() > 1  # not a constant image


def test_heun_is_exact_on_a_linear_field():
    """For v(x, t) = x - c the flow is known in closed form; Heun's error is far below Euler's."""
    class Linear(torch.nn.Module):
        arch = type("A", (), {"num_classes": 1})

        def forward(self, x, t, y, drop=None):
            return x - 0.5

    x1 = torch.ones(1, 1, 1, 1)
    exact = 0.5 + (x1 - 0.5) * torch.exp(torch.tensor(-1.0))  # x(0) = c + (x(1) - c) e^{-1}
    y = torch.zeros(1, dtype=torch.long)
    heun = solve(Linear(), x1, y, steps=8, sampler="heun")
    euler = solve(Linear(), x1, y, steps=8, sampler="euler")
    assert (heun - exact).abs().item() < 0.1 * (euler - exact).abs().item()


def test_unknown_sampler_rejected(model):
    with pytest.raises(ValueError, match="unknown sampler"):
        solve(model, torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), sampler="rk4")


def test_grid_layout():
    imgs = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1).expand(6, 2, 2, 1).contiguous()
    g = grid(imgs, rows=2, pad=1)
    assert g.shape == (2 * 3 + 1, 3 * 3 + 1, 1)
    assert g[1, 1, 0] == 0 and g[1, 4, 0] == 1 and g[4, 1, 0] == 3


@pytest.mark.parametrize("sampler", ["euler", "dpm++2m"])
def test_compiled_network_gives_the_eager_images(model, sampler):
    """compile pads the last batch to a fixed shape; the padding is dropped and the images stay."""
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    kwargs = dict(seed=2, steps=3, sampler=sampler, cfg_scale=2.0, batch_size=4, precision="fp32")
    eager = generate(model, labels, range(6), compile="none", **kwargs)
    compiled = generate(model, labels, range(6), compile="compile", **kwargs)
    assert compiled.shape == eager.shape
    assert (eager.int() - compiled.int()).abs().max() <= 1


def test_bf16_network_is_close_to_fp32(model):
    from genfoundry.sampling.fast import SamplingNetwork

    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 1, 2, 10])
    fp32 = SamplingNetwork(model, "cpu", "fp32")
    bf16 = SamplingNetwork(model, "cpu", "bf16")
    assert fp32.net is model and bf16.net is not model  # cast once, into a copy; the model stays fp32
    assert next(model.parameters()).dtype == torch.float32 and next(bf16.net.parameters()).dtype == torch.bfloat16
    ref, low = fp32(x, t, y), bf16(x, t, y)
    assert low.dtype == torch.float32
    assert (low - ref).abs().mean() < 0.02 * ref.abs().mean() + 1e-3


def test_automatic_choices_per_device():
    from genfoundry.sampling.fast import resolve_compile

    assert resolve_compile("auto", torch.device("cpu")) == "none"
    assert resolve_compile("auto", torch.device("cuda", 0)) == "graphs"
    assert resolve_compile("graphs", torch.device("cpu")) == "compile"  # CUDA graphs need CUDA
    with pytest.raises(ValueError, match="unknown sampling compile mode"):
        resolve_compile("fast", torch.device("cpu"))


def test_fp8_products_stay_close_to_fp32(model):
    """Float8 (e4m3) products with per-row scales: the blocks' linears are replaced, the rest stays."""
    from genfoundry.sampling.fast import Float8Linear, SamplingNetwork

    x, t, y = torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 1, 2, 10])
    ref = SamplingNetwork(model, "cpu", "fp32")(x, t, y)
    bf16 = SamplingNetwork(model, "cpu", "bf16")(x, t, y)
    net = SamplingNetwork(model, "cpu", "fp8")
    replaced = [m for m in net.net.modules() if isinstance(m, Float8Linear)]
    assert len(replaced) == 5 * model.arch.depth  # qkv, proj, two MLP layers and adaLN per block
    assert replaced[0].weight.dtype == torch.float8_e4m3fn
    low = net(x, t, y)
    err, bf16_err = (low - ref).abs().mean(), (bf16 - ref).abs().mean()
    assert err < 3 * bf16_err + 1e-4 and err < 0.05 * ref.abs().mean()


def test_fp8_refused_where_there_are_no_float8_products(model, monkeypatch):
    from genfoundry.errors import ConfigError
    from genfoundry.sampling import fast

    monkeypatch.setattr(fast, "float8_supported", lambda device: False)
    with pytest.raises(ConfigError, match="fp8 needs float8 matrix products"):
        fast.SamplingNetwork(model, "cpu", "fp8")
