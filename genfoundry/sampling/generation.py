"""Images from a trained velocity network: noise, guided velocity, solver, and the work split over ranks.

Image k's starting noise is a pure function of (seed, k), drawn for a whole batch at once on the device
(genfoundry.diffusion.noise). The images are cut into global batches of `batch_size` consecutive
indices, and batch j runs on rank j mod world size: every batch holds the same images in the same
order whatever the number of ranks, so the images do not depend on it. Rank 0 gathers them.
"""

from __future__ import annotations

import torch

from genfoundry import accel, seeding
from genfoundry.diffusion.noise import keyed_normal
from genfoundry.errors import ConfigError
from genfoundry.progress import bar
from genfoundry.sampling.fast import SamplingNetwork
from genfoundry.sampling.solvers import SOLVERS, auto_shift, guidance_scale, time_grid

NOISE_SALT = 7  # the keyed stream of starting noise; training draws its noise from other salts


def image_noise(indices, shape: tuple[int, ...], seed: int, device="cpu") -> torch.Tensor:
    """Starting noise [len(indices), *shape] in float32, row k a pure function of (seed, indices[k])."""
    idx = torch.as_tensor(list(indices) if not isinstance(indices, torch.Tensor) else indices, dtype=torch.int64,
                          device=device)
    return keyed_normal(seeding.mix(seed, idx), shape, device, salt=NOISE_SALT)


def resolve_shift(shift: float, arch) -> float:
    """`shift` 0 means the resolution's: auto_shift of the values per image."""
    return shift if shift > 0 else auto_shift(arch.in_channels * arch.image_size ** 2)


def folded_scale(folded: dict | None, cfg_scale: float, schedule: str, interval) -> float:
    """The weight to guide a network with: `cfg_scale`, or 1 (one conditional pass) for a network whose
    guidance is folded in (genfoundry.trainer.distill) when the guidance asked is the one folded."""
    if not folded:
        return cfg_scale
    asked = {"cfg_scale": float(cfg_scale), "guidance_schedule": schedule, "guidance_interval": list(map(float, interval))}
    if asked != {**folded, "guidance_interval": list(map(float, folded["guidance_interval"]))}:
        raise ConfigError(f"this network is guidance-distilled: its guidance is folded in as cfg_scale "
                          f"{folded['cfg_scale']:g}, guidance_schedule {folded['guidance_schedule']}, interval "
                          f"{folded['guidance_interval']}, and cannot change; sample it with those (its run's "
                          f"[sample] settings), not cfg_scale {cfg_scale:g}, {schedule}, {list(interval)}")
    return 1.0


def guided_velocity(net, x, t: float, y, scale: float, null_class: int) -> torch.Tensor:
    """v_uncond + w (v_cond - v_uncond) (Ho & Salimans 2022) with both halves in one network call; the
    conditional velocity alone where the weight w is 1."""
    tt = torch.full((x.shape[0],), float(t), device=x.device)
    if scale == 1.0:
        return net(x, tt, y)
    both = net(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@torch.no_grad()
def solve(net, noise: torch.Tensor, labels: torch.Tensor, steps: int = 16, sampler: str = "heun",
          cfg_scale: float = 1.0, null_class: int | None = None, guidance_interval=(0.0, 1.0),
          schedule: str = "uniform", shift: float = 1.0, guidance_schedule: str = "constant") -> torch.Tensor:
    """Integrates dx/dt = v from t = 1 (noise) to t = 0 (data) with a solver of SOLVERS on a grid of
    SCHEDULES; the guidance weight at each time follows `guidance_schedule` inside `guidance_interval`."""
    if sampler not in SOLVERS:
        raise ValueError(f"unknown sampler '{sampler}'; choose from {', '.join(SOLVERS)}")
    null_class = net.arch.num_classes if null_class is None else null_class
    ts = time_grid(schedule, steps, shift)

    def velocity(x, t):
        scale = guidance_scale(cfg_scale, guidance_schedule, t, guidance_interval)
        return guided_velocity(net, x, t, labels, scale, null_class).float()

    return SOLVERS[sampler].run(velocity, noise.float(), ts)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float NCHW -> uint8 NHWC, on the CPU."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def rank_batches(num_images: int, batch_size: int, rank: int | None = None, world: int | None = None) -> list[range]:
    """The positions each of this rank's batches holds: global batch j (positions j*b .. j*b+b-1) runs on
    rank j mod world."""
    rank = accel.rank() if rank is None else rank
    world = accel.world_size() if world is None else world
    return [range(start, min(start + batch_size, num_images))
            for start in range(rank * batch_size, num_images, world * batch_size)]


def generate(model, labels: torch.Tensor, indices, seed: int = 0, steps: int = 16, sampler: str = "heun",
             cfg_scale: float = 1.0, batch_size: int = 256, device=None, precision: str = "auto",
             progress: bool = True, guidance_interval=(0.0, 1.0), schedule: str = "uniform", shift: float = 0.0,
             guidance_schedule: str = "constant", compile: str = "none", shared: bool = False) -> torch.Tensor:
    """uint8 NHWC images for the given labels; image k uses noise (seed, indices[k]).

    `precision` and `compile` choose the network's fast path (genfoundry.sampling.fast); `model` may
    also be a SamplingNetwork made once, whose own choices then stand. The ODE state stays in float32.
    `shift` (of the shift schedule) 0 takes the resolution's. With `shared`, in a process group, each
    rank makes its batches (rank_batches) and rank 0 gathers them: rank 0 returns every image, the
    other ranks theirs, in place, with the rest left zero.
    `progress`: a bar over this rank's images (rank 0, on a terminal)."""
    prepared = isinstance(model, SamplingNetwork)  # one made once for many calls keeps its compiled graphs
    arch = model.arch
    device = model.device if prepared else torch.device(device or next(model.parameters()).device)
    indices = torch.as_tensor(list(indices), dtype=torch.int64)
    if len(labels) != len(indices):
        raise ValueError(f"{len(labels)} labels for {len(indices)} images")
    shape = (arch.in_channels, arch.image_size, arch.image_size)
    gathered = shared and accel.distributed()  # (a one-rank group gathers too: its collective is checked)
    world = accel.world_size() if gathered else 1
    batches = rank_batches(len(indices), batch_size, accel.rank() if gathered else 0, world)
    out = torch.empty((len(indices), *shape[1:], shape[0]), dtype=torch.uint8)
    if len(indices) == 0:
        return out
    cfg_scale = folded_scale(getattr(model, "folded_guidance", None), cfg_scale, guidance_schedule, guidance_interval)
    net = model if prepared else SamplingNetwork(model, device, precision, compile)
    shift = resolve_shift(shift, arch)
    with bar(sum(len(b) for b in batches), "sample", enabled=progress) as shown:
        for positions in batches:
            idx, y = indices[positions.start:positions.stop], labels[positions.start:positions.stop]
            if net.fixed_shapes and len(idx) < batch_size:  # pad: a new batch size is a new graph to build
                pad = batch_size - len(idx)
                idx = torch.cat([idx, idx[-1:].expand(pad)])
                y = torch.cat([y, y[-1:].expand(pad)])
            noise = image_noise(idx, shape, seed, device)
            x = solve(net, noise, y.to(device), steps, sampler, cfg_scale, guidance_interval=guidance_interval,
                      schedule=schedule, shift=shift, guidance_schedule=guidance_schedule)
            out[positions.start:positions.stop] = to_uint8(x[:len(positions)])
            shown.update(len(positions))
    return gather_batches(out, batch_size, world) if gathered else out


def gather_batches(out: torch.Tensor, batch_size: int, world: int) -> torch.Tensor:
    """Every rank's batches (written into its own copy of `out`) into rank 0's copy, one round of one
    batch per rank at a time, so no rank holds more than a round beyond its own images."""
    rank = accel.rank()
    shares = [rank_batches(len(out), batch_size, r, world) for r in range(world)]
    for j in range(len(shares[0])):  # rank 0 has the most batches
        mine = shares[rank][j] if j < len(shares[rank]) else range(0)
        local = torch.zeros((batch_size, *out.shape[1:]), dtype=torch.uint8)
        local[:len(mine)] = out[mine.start:mine.stop]
        parts = accel.gather(local)
        if parts is not None:
            for r, part in enumerate(parts):
                if j < len(shares[r]):
                    b = shares[r][j]
                    out[b.start:b.stop] = part[:len(b)].cpu()
    return out


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
