"""Sampling on a CUDA GPU: the compiled network replayed as CUDA graphs gives the eager images, the noise
drawn on the device is the noise drawn on the host, and generation shared over a one-rank NCCL group
(NCCL takes device tensors only) gives the images of one process. They skip without CUDA."""

import pytest
import torch

from multiproc import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model():
    from genfoundry.models import build_model

    torch.manual_seed(0)
    model = build_model("DiT-S/4", 32, 4, 10)
    for p in model.parameters():  # leave the adaLN-Zero start, so that the sampler has something to integrate
        torch.nn.init.normal_(p, std=0.03)
    return model.cuda().eval()


def test_device_noise_equals_host_noise():
    from genfoundry.sampling import image_noise

    host = image_noise(range(300), (4, 32, 32), seed=5)
    device = image_noise(torch.arange(300, device="cuda"), (4, 32, 32), seed=5, device="cuda")
    torch.testing.assert_close(device.cpu(), host, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler", ["heun", "dpm++2m"])
def test_cuda_graphs_give_the_eager_images(sampler):
    from genfoundry.sampling import generate

    model = _model()
    labels = torch.arange(10).repeat(3)[:27]  # 27 images in batches of 8: the last one padded
    kwargs = dict(seed=1, steps=6, sampler=sampler, cfg_scale=2.0, batch_size=8, precision="bf16", schedule="logsnr",
                  progress=False)
    eager = generate(model, labels, range(27), compile="none", **kwargs)
    graphs = generate(model, labels, range(27), compile="graphs", **kwargs)
    diff = (eager.int() - graphs.int()).abs()
    # fused kernels round bf16 in other places: about half a grey level on average, rarely more than 8
    assert diff.float().mean() < 1.0 and (diff > 8).float().mean() < 0.01
    fp32 = generate(model, labels, range(27), compile="none", **{**kwargs, "precision": "fp32"})
    assert (fp32.int() - eager.int()).abs().float().mean() < 2.0


def test_fp8_as_cuda_graphs_gives_the_eager_fp8_images():
    from genfoundry.sampling import generate
    from genfoundry.sampling.fast import float8_supported

    if not float8_supported(torch.device("cuda")):
        pytest.skip("this GPU has no float8 matrix products")
    model = _model()
    labels = torch.arange(10).repeat(2)
    kwargs = dict(seed=1, steps=6, sampler="dpm++2m", cfg_scale=2.0, batch_size=8, progress=False)
    eager = generate(model, labels, range(20), compile="none", precision="fp8", **kwargs)
    graphs = generate(model, labels, range(20), compile="graphs", precision="fp8", **kwargs)
    bf16 = generate(model, labels, range(20), compile="none", precision="bf16", **kwargs)
    assert (eager.int() - graphs.int()).abs().float().mean() < 1.0
    assert (eager.int() - bf16.int()).abs().float().mean() < 4.0


def _shared_generation(rank, world, out):
    from genfoundry.sampling import generate

    model = _model()
    labels = torch.arange(10)
    images = generate(model, labels, range(10), seed=3, steps=4, sampler="dpm++2m", cfg_scale=1.5, batch_size=4,
                      precision="bf16", compile="none", progress=False, shared=True)
    alone = generate(model, labels, range(10), seed=3, steps=4, sampler="dpm++2m", cfg_scale=1.5, batch_size=4,
                     precision="bf16", compile="none", progress=False)
    torch.save({"shared": images, "alone": alone}, out)


@pytest.mark.skipif(not torch.distributed.is_nccl_available(), reason="needs NCCL")
def test_shared_generation_in_a_one_rank_nccl_group(tmp_path):
    run_ranks(_shared_generation, 1, str(tmp_path / "out.pt"), backend="nccl", timeout=300)
    result = torch.load(tmp_path / "out.pt")
    assert torch.equal(result["shared"], result["alone"])
