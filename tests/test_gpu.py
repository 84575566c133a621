"""Accelerator-only checks; they skip, with the reason, on machines without CUDA."""

import pytest
import torch

from genfoundry.data import gpu_decode

pytestmark = pytest.mark.skipif(not gpu_decode.available(torch.device("cuda")) or not torch.cuda.is_available(),
                                reason="needs a CUDA device and torchvision with CUDA")


def _jpeg_shards(tmp_path, count=24):
    import numpy as np
    from PIL import Image

    from genfoundry.shards import pack

    rng = np.random.default_rng(0)
    for i in range(count):
        yy, xx = np.mgrid[0:300, 0:400]
        image = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (1, 1, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=95)
    (tmp_path / "bad.jpg").write_bytes(open(tmp_path / "0.jpg", "rb").read()[:400])  # truncated
    pack(str(tmp_path), str(tmp_path / "shards"), workers=1, progress=False)


def test_gpu_decode_matches_cpu_decode(tmp_path):
    from genfoundry.data import DataPipeline, Normalize, RandomHorizontalFlip, RandomResizedCrop

    _jpeg_shards(tmp_path)

    def loader(gpu):
        p = DataPipeline()
        for t in (RandomResizedCrop(64), RandomHorizontalFlip(), Normalize([0.5] * 3, [0.5] * 3)):
            p.add_transform(t)
        return p.loader(str(tmp_path / "shards"), 12, device="cuda", seed=0, gpu_decode=gpu)

    for a, b in zip(iter(loader(True)), iter(loader(False))):
        assert a.images.shape == b.images.shape and list(a.indices) == list(b.indices)
        # Boxes are rounded to whole pixels on the GPU path, so allow a small difference.
        assert (a.images - b.images).abs().mean().item() < 0.06
        break


def test_gpu_decode_in_workers_equals_decode_in_main_process(tmp_path):
    """Spawned workers with their own decoders hand over the same batches, across an epoch and a resume."""
    from genfoundry.data import DataPipeline, RandomHorizontalFlip, RandomResizedCrop

    _jpeg_shards(tmp_path, count=40)

    def loader(in_workers):
        p = DataPipeline()
        # a lambda does not pickle into spawned workers: the pipeline must leave it behind
        for t in (RandomResizedCrop(64), RandomHorizontalFlip(), lambda x: x * 2 - 1):
            p.add_transform(t)
        return p.loader(str(tmp_path / "shards"), 8, device="cuda", seed=0, gpu_decode=True, num_workers=2,
                        decode_in_workers=in_workers)

    ours, main = loader(True), loader(False)
    assert ours.worker_decode and not main.worker_decode
    a_it, b_it = iter(ours), iter(main)
    for _ in range(7):  # 40 good samples, 5 batches of 8 an epoch: crosses into the second epoch
        a, b = next(a_it), next(b_it)
        assert list(a.indices) == list(b.indices)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    resumed = loader(True)
    resumed.load_state_dict(ours.state_dict())
    a, b = next(iter(resumed)), next(b_it)
    assert list(a.indices) == list(b.indices) and torch.equal(a.images, b.images)


def test_flip_on_the_device_equals_flip_on_the_host():
    from genfoundry.data import RandomHorizontalFlip

    x = torch.randint(0, 255, (16, 3, 8, 12), dtype=torch.uint8)
    params = (torch.rand(16, 1) < 0.5).float()
    host = RandomHorizontalFlip().apply(x.clone(), params)
    device = RandomHorizontalFlip().apply(x.cuda(), params.cuda())
    assert torch.equal(host, device.cpu()) and not torch.equal(host, x)
