"""Euler and Heun ODE samplers for the flow-matching velocity field, with classifier-free guidance.

Image i's starting noise comes from its own generator seeded by (seed, i), so an image does not
depend on the batch size nor on how many processes share the work.
"""

from __future__ import annotations

import torch

from genfoundry import accel, seeding
from genfoundry.progress import bar


def image_noise(indices, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Noise for the images with these global indices, each from its own seed, on the CPU."""
    out = torch.empty((len(indices), *shape))
    gen = torch.Generator()
    for row, i in enumerate(indices):
        gen.manual_seed(seeding.mix(seed, int(i)))
        out[row] = torch.randn(shape, generator=gen)
    return out


def guided_velocity(model, x, t, y, cfg_scale: float, null_class: int, interval=(0.0, 1.0)):
    """v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022), both halves in one batch; outside the
    guidance interval of times (Kynkaanniemi et al. 2024) the conditional velocity alone."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
        return model(x, tt, y)
    both = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


@torch.no_grad()
def solve(model, noise: torch.Tensor, labels: torch.Tensor, steps: int = 16, sampler: str = "heun",
          cfg_scale: float = 1.0, null_class: int | None = None, guidance_interval=(0.0, 1.0)) -> torch.Tensor:
    """Integrates dx/dt = v from t = 1 (noise) to t = 0 (data) on a uniform grid; guidance applies at
    the times inside `guidance_interval` (t = 1 is noise)."""
    if sampler not in ("euler", "heun"):
        raise ValueError(f"unknown sampler '{sampler}'; use 'euler' or 'heun'")
    null_class = model.arch.num_classes if null_class is None else null_class
    ts = torch.linspace(1.0, 0.0, steps + 1).tolist()
    x = noise
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        v = guided_velocity(model, x, t, labels, cfg_scale, null_class, guidance_interval)
        x_euler = x + (t_next - t) * v
        if sampler == "heun" and t_next > 0:
            v_next = guided_velocity(model, x_euler, t_next, labels, cfg_scale, null_class, guidance_interval)
            x = x + (t_next - t) * 0.5 * (v + v_next)
        else:
            x = x_euler
    return x


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def generate(model, labels: torch.Tensor, indices, seed: int = 0, steps: int = 16, sampler: str = "heun",
             cfg_scale: float = 1.0, batch_size: int = 256, device=None, precision: str = "fp32",
             progress: bool = True, guidance_interval=(0.0, 1.0)) -> torch.Tensor:
    """uint8 NHWC images for the given labels; image k uses noise seed (seed, indices[k]).

    `precision` applies to the network only; the ODE state stays in float32. `progress`: a bar over the
    images (genfoundry.progress.bar: rank 0, on a terminal)."""
    arch = model.arch
    device = torch.device(device or next(model.parameters()).device)
    indices = list(indices)
    shape = (arch.in_channels, arch.image_size, arch.image_size)
    out = []
    with bar(len(indices), "sample", enabled=progress) as shown:
        for start in range(0, len(indices), batch_size):
            idx = indices[start:start + batch_size]
            noise = image_noise(idx, shape, seed).to(device)
            y = labels[start:start + batch_size].to(device)
            with accel.autocast(device, precision):
                out.append(to_uint8(solve(model, noise, y, steps, sampler, cfg_scale,
                                        guidance_interval=guidance_interval)))
            shown.update(len(idx))
    return torch.cat(out) if out else torch.empty((0, *shape[1:], shape[0]), dtype=torch.uint8)


def grid(images: torch.Tensor, rows: int, pad: int = 2) -> torch.Tensor:
    """uint8 NHWC images -> one uint8 HWC grid with `rows` rows."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    canvas = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=torch.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[k]
    return canvas


def save_png(image_hwc: torch.Tensor, path) -> None:
    """Whole or not at all: a live report (or a crash) never meets half a grid."""
    import io

    from PIL import Image

    from genfoundry.checkpoint.storage import write_atomic

    array = image_hwc.numpy()
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[2] == 1 else array).save(buffer, format="PNG")
    write_atomic(path, buffer.getvalue())
