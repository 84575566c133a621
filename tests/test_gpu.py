"""Accelerator-only checks; they skip, with the reason, on machines without CUDA."""

import pytest
import torch

from genfoundry.data import gpu_decode

pytestmark = pytest.mark.skipif(not gpu_decode.available(torch.device("cuda")) or not torch.cuda.is_available(),
                                reason="needs a CUDA device and torchvision with CUDA")


def test_gpu_decode_matches_cpu_decode(tmp_path):
    import numpy as np
    from PIL import Image

    from genfoundry.data import DataPipeline, Normalize, RandomHorizontalFlip, RandomResizedCrop
    from genfoundry.shards import pack

    rng = np.random.default_rng(0)
    for i in range(24):
        yy, xx = np.mgrid[0:300, 0:400]
        image = np.stack([xx % 256, yy % 256, (xx * yy) % 256], -1) + rng.integers(0, 30, (1, 1, 3))
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(tmp_path / f"{i}.jpg", quality=95)
    (tmp_path / "bad.jpg").write_bytes(open(tmp_path / "0.jpg", "rb").read()[:400])  # truncated
    pack(str(tmp_path), str(tmp_path / "shards"), workers=1, progress=False)

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
