"""JPEG decoding on the GPU (nvJPEG through torchvision), with the fused crop and resize done there too.

Each batch's bytes and planned crop boxes are decoded in one batched call and every box is resampled
with antialiased bilinear interpolation. torchvision keeps one nvJPEG decoder per process behind a
lock, and its batched decode spends as much host time as it takes (the Huffman stage runs on the
host), so several decodes in flight need several processes: with worker processes the loader decodes
in the workers (spawned, each with its own CUDA context) and hands the decoded batches to the training
process through CUDA IPC.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from genfoundry.shards.index import ShardError


def available(device: torch.device) -> bool:
    """True where torchvision can decode JPEG on this device (a CUDA build beside a CUDA device)."""
    if device.type != "cuda":
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # absent, or a build that does not import beside this torch
        return False
    return True


def decode_packed(packed, n: int, channels: int, device: torch.device):
    """A batch as the shard reader packs it for GPU decoding -> (uint8 [n, h, w, C] on `device`,
    {slot: reason} for JPEGs that only nvJPEG found broken; their rows are left zero)."""
    blob, lengths, jpeg_slots, plans, others = packed
    sizes = {tuple(pl[1]) for pl in plans} | {(im.shape[1], im.shape[0]) for im in others.values()}
    if len(sizes) > 1:
        raise ShardError(f"samples of one batch have different sizes {sorted(sizes)}; end the size "
                         f"transforms with a fixed-size crop or Resize((height, width))")
    w, h = sizes.pop()
    out = torch.empty((n, h, w, channels), dtype=torch.uint8, device=device)
    late = {}
    if jpeg_slots:
        starts = [0]
        for length in lengths:
            starts.append(starts[-1] + length)
        datas = [blob[starts[i]:starts[i + 1]] for i in range(len(lengths))]
        decoded, failed = decode_batch(datas, plans, channels, device)
        out[jpeg_slots] = decoded
        late = {jpeg_slots[i]: reason for i, reason in failed.items()}
    for slot, image in others.items():
        out[slot] = image.to(device, non_blocking=True)
    return out, late


def _integer_box(box, width: int, height: int) -> tuple[int, int, int, int]:
    x0, y0 = max(0, math.floor(box[0])), max(0, math.floor(box[1]))
    return x0, y0, min(width, max(x0 + 1, math.ceil(box[2]))), min(height, max(y0 + 1, math.ceil(box[3])))


def decode_batch(datas: list[torch.Tensor], plans: list, channels: int, device: torch.device):
    """uint8 [n, h, w, C] on `device` for JPEG byte tensors and their (box, (w, h)) plans, and
    {position: reason} for those that failed to decode (their rows are left zero)."""
    import torchvision.io
    from torchvision.io import ImageReadMode

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    failures = {}
    try:
        decoded = torchvision.io.decode_jpeg(datas, mode=mode, device=device)
    except RuntimeError:
        # One bad image fails the whole call: decode one by one to find it.
        decoded = []
        for i, data in enumerate(datas):
            try:
                decoded.append(torchvision.io.decode_jpeg(data, mode=mode, device=device))
            except RuntimeError as e:
                failures[i] = f"nvJPEG: {e}".splitlines()[0]
                decoded.append(None)
    out_w, out_h = plans[0][1]
    shapes = {tuple(im.shape) for im in decoded if im is not None}
    if not failures and len(shapes) == 1:
        return _roi_resample(decoded, plans, out_h, out_w), failures
    out = torch.zeros((len(datas), channels, out_h, out_w), dtype=torch.float32, device=device)
    for i, (image, (box, _)) in enumerate(zip(decoded, plans)):
        if image is None:
            continue
        x0, y0, x1, y1 = _integer_box(box, image.shape[2], image.shape[1])
        crop = image[None, :, y0:y1, x0:x1].float()
        if crop.shape[2:] == (out_h, out_w):
            out[i] = crop[0]
        else:
            out[i] = F.interpolate(crop, size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)[0]
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1), failures


def _roi_resample(decoded: list[torch.Tensor], plans: list, out_h: int, out_w: int) -> torch.Tensor:
    """All boxes of a batch of equal-size images in one kernel. roi_align with an adaptive sampling
    ratio averages ceil(box / output) bilinear samples per output pixel, so downscaling is antialiased."""
    from torchvision.ops import roi_align

    images = torch.stack(decoded).float()
    boxes = torch.tensor([[i, *box] for i, (box, _) in enumerate(plans)], dtype=torch.float32, device=images.device)
    out = roi_align(images, boxes, output_size=(out_h, out_w), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
