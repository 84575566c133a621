import io
import json
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from genfoundry.data import (ColorJitter, DataPipeline, InMemoryLoader, Loader, Normalize, RandomCrop,
                             RandomHorizontalFlip, RandomResizedCrop, Resize)
from genfoundry.data.decode import decode, image_size
from genfoundry.data.order import GlobalBatches, global_order
from genfoundry.shards import ShardDataset, pack
from genfoundry.sources import ImageSet


def _photo(seed: int, w: int = 120, h: int = 90) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 2 % 256, yy * 3 % 256, (xx + yy) % 256], -1)
    return (base + rng.integers(0, 40, size=(1, 1, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """60 JPEGs in 2 classes, packed into shards of 16 (the last one holds 12)."""
    root = tmp_path_factory.mktemp("photos")
    for i in range(60):
        folder = root / ("cats" if i % 2 else "dogs")
        folder.mkdir(exist_ok=True)
        Image.fromarray(_photo(i)).save(folder / f"{i:03d}.jpg", quality=90)
    out = tmp_path_factory.mktemp("shards")
    pack(str(root), str(out), samples_per_shard=16, workers=1, progress=False)
    return str(out)


def test_the_documented_pipeline_code_works_as_written():
    pipeline = DataPipeline()
    pipeline.add_transform(RandomCrop(size=(512, 512)))
    pipeline.add_transform(ColorJitter(brightness=0.3))
    pipeline.add_transform(Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]))
    assert len(pipeline.size_transforms) == 1 and len(pipeline.batch_transforms) == 2


def test_size_transform_after_batch_transform_is_refused():
    pipeline = DataPipeline().add_transform(RandomHorizontalFlip())
    with pytest.raises(ValueError, match="add it before RandomHorizontalFlip"):
        pipeline.add_transform(Resize(32))


def test_global_order_is_a_deterministic_permutation_with_shard_locality():
    sizes = [100] * 20
    a, b = global_order(sizes, seed=3, epoch=0, window=100), global_order(sizes, seed=3, epoch=0, window=100)
    assert np.array_equal(a, b) and np.array_equal(np.sort(a), np.arange(2000))
    assert not np.array_equal(a, global_order(sizes, seed=3, epoch=1, window=100))
    shards_per_window = [len(set(a[i:i + 100] // 100)) for i in range(0, 2000, 100)]
    assert max(shards_per_window) == 1  # a window of one shard's size stays inside that shard


def test_uneven_world_size_is_one_clear_error():
    with pytest.raises(ValueError, match="does not split into 4 ranks x 1 micro-batches"):
        GlobalBatches([10, 10], global_batch_size=6).local_batch_size(4)


def test_decode_fuses_crop_and_resize_and_uses_reduced_scale_only_when_it_pays():
    photo = _photo(0, 400, 300)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=95)
    data = buf.getvalue()
    assert image_size(data) == (400, 300)
    half = decode(data, (0, 0, 400, 300), (100, 75))  # 4x smaller: decoded at reduced DCT scale
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((100, 75), Image.Resampling.BILINEAR))
    assert half.shape == (75, 100, 3) and np.abs(half.astype(int) - full).mean() < 4
    crop = decode(data, (100, 50, 300, 250), (150, 150))  # under 2x: full-scale decode, then the box
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((150, 150), Image.Resampling.BILINEAR,
                                                                          box=(100, 50, 300, 250)))
    diff = np.abs(crop.astype(int) - ref)
    assert crop.shape == ref.shape and diff.mean() < 0.1 and (diff <= 1).mean() > 0.99  # the same filter as Pillow
    fractional = decode(data, (100.5, 50.25, 300.5, 250.25), (150, 150))  # sub-pixel box: Pillow's resampler
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((150, 150), Image.Resampling.BILINEAR,
                                                                          box=(100.5, 50.25, 300.5, 250.25)))
    assert np.array_equal(fractional, ref)


def test_fast_jpeg_decode_is_close_to_the_accurate_one_but_not_equal():
    pytest.importorskip("simplejpeg", reason="fast_jpeg switches simplejpeg's decoder; Pillow has no such switch")
    photo = _photo(0, 400, 300)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "JPEG", quality=90)  # 4:2:0 chroma, which fast upsampling changes
    accurate = decode(buf.getvalue(), (50, 20, 350, 280), (200, 200)).astype(float)  # full-scale decode
    fast = decode(buf.getvalue(), (50, 20, 350, 280), (200, 200), fast_jpeg=True).astype(float)
    psnr = 10 * np.log10(255**2 / np.mean((fast - accurate) ** 2))
    assert 30 < psnr < 80  # it is another decode, and a close one
    p = DataPipeline(fast_jpeg=True).add_transform(RandomResizedCrop(32))
    assert p.for_workers().fast_jpeg


def _pipeline():
    p = DataPipeline()
    for t in (RandomResizedCrop(32, scale=(0.3, 1.0)), RandomHorizontalFlip(), ColorJitter(0.3, 0.3, 0.3, 0.05),
              Normalize([0.5] * 3, [0.5] * 3)):
        p.add_transform(t)
    return p


def test_both_loaders_are_loaders(shards):
    images = ImageSet("tiny", np.zeros((8, 4, 4, 1), np.uint8), np.zeros(8, np.int64), ["a"])
    assert isinstance(InMemoryLoader(images, 4), Loader)
    assert isinstance(_pipeline().loader(shards, 8), Loader)
    assert not isinstance(object(), Loader)


def test_images_do_not_depend_on_workers_or_batching(shards):
    one = next(iter(_pipeline().loader(shards, 8, seed=1, num_workers=0, rank=0, world_size=1)))
    two = next(iter(_pipeline().loader(shards, 8, seed=1, num_workers=2, rank=0, world_size=1)))
    torch.testing.assert_close(one.images, two.images, rtol=0, atol=0)
    halves = [next(iter(_pipeline().loader(shards, 8, seed=1, rank=r, world_size=2))) for r in range(2)]
    torch.testing.assert_close(torch.cat([h.images for h in halves]), one.images, rtol=0, atol=0)
    assert one.images.shape == (8, 3, 32, 32) and one.images.dtype == torch.float32


def test_corrupt_sample_is_skipped_counted_and_substituted(shards, tmp_path):
    dataset = ShardDataset(shards)
    bad = 7

    class Corrupting:  # the real dataset, with one sample's bytes broken on the way
        shards = dataset.shards

        def read(self, index):
            data, meta = dataset.read(index)
            return (b"\xff\xd8broken" if index == bad else data), meta

    loader = _pipeline().loader(Corrupting(), 12, seed=2)
    clean = _pipeline().loader(shards, 12, seed=2)
    for broken, good in zip(iter(loader), iter(clean)):
        assert broken.images.shape == good.images.shape and list(broken.indices) == list(good.indices)
        if bad in broken.indices:
            slot = list(broken.indices).index(bad)
            donor = (slot + 1) % 12
            torch.testing.assert_close(broken.images[slot], good.images[donor], rtol=0, atol=0)
            break
    assert sum(loader.corrupt.values()) == 1 and "DecodeError" in next(iter(loader.corrupt_reasons.values()))


def _elastic_worker(rank, world_size, port, shards, state_in, state_out, steps, out_file):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    loader = _pipeline().loader(shards, 6, seed=5, rank=rank, world_size=world_size)
    if state_in:
        loader.load_state_dict(json.loads(open(state_in).read()))
    it = iter(loader)
    rows = []
    for _ in range(steps):
        b = next(it)
        parts = [torch.zeros(2, b.images.shape[0], dtype=torch.float64) for _ in range(world_size)]
        mine = torch.stack([torch.as_tensor(b.indices, dtype=torch.float64), b.images.double().sum((1, 2, 3))])
        dist.all_gather(parts, mine)
        rows.append(torch.cat(parts, dim=1).tolist())
    if rank == 0:
        with open(out_file, "w") as f:
            json.dump(rows, f)
        if state_out:
            with open(state_out, "w") as f:
                json.dump(loader.state_dict(), f)
    dist.destroy_process_group()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world_size, *args):
    mp.spawn(_elastic_worker, args=(world_size, _free_port(), *args), nprocs=world_size, join=True)


@pytest.mark.timeout(300)
def test_elastic_resume_2_then_3_ranks_equals_the_uninterrupted_stream(shards, tmp_path):
    """Global batches of 6 over 60 samples: 10 per epoch, so 12 steps cross an epoch boundary."""
    total, first = 12, 5
    _run(1, shards, None, None, total, str(tmp_path / "whole.json"))
    _run(2, shards, None, str(tmp_path / "state.json"), first, str(tmp_path / "a.json"))
    _run(3, shards, str(tmp_path / "state.json"), None, total - first, str(tmp_path / "b.json"))
    whole = json.loads((tmp_path / "whole.json").read_text())
    resumed = json.loads((tmp_path / "a.json").read_text()) + json.loads((tmp_path / "b.json").read_text())
    assert len(resumed) == total
    for w, r in zip(whole, resumed):
        assert w[0] == r[0]                      # the same samples in the same order
        np.testing.assert_allclose(w[1], r[1], rtol=1e-6)  # with the same augmentations
