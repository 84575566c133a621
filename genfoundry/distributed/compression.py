"""Gradient compression as DDP communication hooks: top-k sparsification with error feedback, and PowerSGD.

`register(ddp_model, "topk" | "powersgd", **options)` installs a hook and returns its state. Every state
counts, cumulatively for this rank:

- `bytes_sent`: bytes this rank put on the network for gradients, assuming ring collectives: an
  all-reduce of n elements sends 2 (p - 1) / p * n * itemsize, an all-gather of c bytes per rank sends
  (p - 1) * c, where p is the number of ranks;
- `dense_bytes`: what the plain all-reduce of the same buckets would have sent.

`dense_bytes / bytes_sent` is the compression ratio. FSDP2 reduce-scatters are not compressed; see
`check_fsdp_compression`.

Under fp16 the gradients reach a hook multiplied by the loss scale. The trainer says so before each
step (`HookState.begin_step`), and the hooks keep their error feedback in unscaled units, so a change
of loss scale does not mis-weight it. A step the loss scaler skips (an overflow put inf or NaN into
the gradients, and so into the error feedback) is undone by `finish_step(applied=False)`: top-k
restores the residuals it had before the step, PowerSGD zeroes its error feedback and draws new Q.
"""

# No `from __future__ import annotations`: DDP inspects a hook's annotations as objects and rejects strings.

import math

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import PowerSGDState, _should_compress, powerSGD_hook

from genfoundry import seeding
from genfoundry.errors import ConfigError

# torch 2.13 renamed all_gather_into_tensor to all_gather_single; 2.11 has only the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def allreduce_bytes(numel: int, itemsize: int, world: int) -> int:
    """Bytes one rank sends in a ring all-reduce of `numel` elements: 2 (p - 1) / p * n * itemsize."""
    return 2 * (world - 1) * numel * itemsize // world


def allgather_bytes(nbytes: int, world: int) -> int:
    """Bytes one rank sends in a ring all-gather where each rank contributes `nbytes`: (p - 1) * nbytes."""
    return (world - 1) * nbytes


def _group_size(process_group) -> int:
    return (process_group or dist.group.WORLD).size()


class HookState:
    """What the trainer asks of a communication hook's state around each optimizer step.

    `begin_step(grad_scale, may_skip)` comes before the backward pass that synchronises gradients:
    they arrive multiplied by `grad_scale`, and `may_skip` says whether the step may yet be dropped
    (fp16). `finish_step(applied)` comes once the step was applied or skipped. Per-rank state is
    `state_dict()` / `load_state_dict()`; `resume_schedule(state)` takes from a checkpoint written on
    another number of ranks only what survives that (the schedule) and says what restarts.
    """

    bytes_sent = 0
    dense_bytes = 0
    grad_scale = 1.0
    may_skip = False

    def begin_step(self, grad_scale: float = 1.0, may_skip: bool = False) -> None:
        self.grad_scale, self.may_skip = float(grad_scale), may_skip

    def finish_step(self, applied: bool) -> None:
        pass


# ---- top-k with error feedback -------------------------------------------------------------------


def kept_count(numel: int, density: float) -> int:
    """How many of `numel` entries a step at `density` sends; at least one, at most all."""
    return max(1, min(numel, round(density * numel)))


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def select_topk(grad: torch.Tensor, residual: torch.Tensor, k: int, scale: float = 1.0):
    """The k largest-magnitude entries of grad / scale + residual, and what is left behind.

    `grad` is a gradient multiplied by `scale` (the fp16 loss scale; 1 otherwise) and `residual` is
    unscaled. Returns (indices, values, new_residual): values are scaled again and in the gradient's
    dtype, as they are sent; new_residual (fp32, unscaled) is (grad / scale + residual) - sent / scale,
    so sent / scale + new_residual == grad / scale + residual exactly for a power-of-two scale,
    including the rounding of values to a 16-bit gradient dtype.
    """
    accumulated = grad.float() / scale + residual if scale != 1.0 else grad.float() + residual
    indices = torch.topk(accumulated.abs(), k, sorted=False).indices
    values = (accumulated[indices] * scale).to(grad.dtype)
    accumulated[indices] -= values.float() / scale if scale != 1.0 else values.float()
    return indices, values, accumulated


class TopKState(HookState):
    """Per-rank state of the top-k hook: schedule, residuals per parameter and byte counters.

    The kept fraction ("density") is 1 for the first `dense_steps` synchronised steps (plain all-reduce),
    then decays geometrically from `start_density` to `ratio` over `warmup_steps` steps:
    density(t) = start_density * (ratio / start_density) ** (t / warmup_steps), t counted from the end
    of the dense steps; `ratio` from then on. Steps are counted in the hook, which DDP calls only on
    synchronised backward passes, so micro-steps under `no_sync()` do not advance the schedule.
    """

    def __init__(self, process_group=None, ratio: float = 0.01, warmup_steps: int = 100,
                 start_density: float = 0.25, dense_steps: int = 1):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"top-k ratio must be in (0, 1], got {ratio}")
        if warmup_steps < 0 or dense_steps < 0:
            raise ConfigError(f"top-k warmup_steps and dense_steps must be >= 0, got {warmup_steps}, {dense_steps}")
        self.process_group = process_group
        self.ratio = ratio
        self.warmup_steps = warmup_steps
        self.start_density = max(start_density, ratio)
        self.dense_steps = dense_steps
        self.step = 0
        # Residuals are kept per parameter (by its position in the model), not per bucket: DDP lays its
        # buckets out again after the first iteration, and again after every restart.
        self.residuals: dict[int, torch.Tensor] = {}
        self.positions: dict[int, int] = {}  # id(parameter) -> position; filled by register()
        self.bytes_sent = 0
        self.dense_bytes = 0
        # While a step may still be skipped: the residuals it replaced, and the schedule before it.
        self._replaced: dict[int, torch.Tensor | None] = {}
        self._step_before = 0

    def begin_step(self, grad_scale: float = 1.0, may_skip: bool = False) -> None:
        super().begin_step(grad_scale, may_skip)
        self._replaced.clear()
        self._step_before = self.step

    def finish_step(self, applied: bool) -> None:
        """A skipped step leaves residuals and schedule as they were before it."""
        if not applied and self.may_skip:
            for position, old in self._replaced.items():
                if old is None:
                    self.residuals.pop(position, None)
                else:
                    self.residuals[position] = old
            self.step = self._step_before
        self._replaced.clear()

    def density(self, step: int | None = None) -> float:
        """Fraction of entries kept at synchronised step `step` (default: the current one)."""
        step = self.step if step is None else step
        if step < self.dense_steps:
            return 1.0
        t = step - self.dense_steps
        if t >= self.warmup_steps:
            return self.ratio
        return self.start_density * (self.ratio / self.start_density) ** (t / self.warmup_steps)

    def bucket_residual(self, bucket) -> torch.Tensor:
        """The fp32 residual of a bucket's parameters, laid out as its flat gradient buffer."""
        grad = bucket.buffer()
        parts = [self.residuals.get(self.positions.get(id(p), -1)) for p in bucket.parameters()]
        if all(r is None for r in parts):
            return torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        return torch.cat([r.to(grad.device) if r is not None else
                          torch.zeros(p.numel(), dtype=torch.float32, device=grad.device)
                          for r, p in zip(parts, bucket.parameters())])

    def keep_residual(self, bucket, residual: torch.Tensor) -> None:
        """Stores a bucket's new residual, split back into its parameters."""
        params = bucket.parameters()
        for p, part in zip(params, residual.split([p.numel() for p in params])):
            position = self.positions.setdefault(id(p), len(self.positions))
            if self.may_skip and position not in self._replaced:
                self._replaced[position] = self.residuals.get(position)
            self.residuals[position] = part

    def state_dict(self) -> dict:
        return {"step": self.step, "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
                "residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.bytes_sent, self.dense_bytes = state["step"], state["bytes_sent"], state["dense_bytes"]
        self.residuals = dict(state["residuals"])

    def resume_schedule(self, state: dict) -> str:
        self.step = state["step"]
        return "top-k residuals are this rank's own, so they restart at zero"


def select_topk_per_parameter(grad: torch.Tensor, residual: torch.Tensor, sizes: list[int], density: float,
                              scale: float = 1.0):
    """`select_topk` on each parameter's slice of a flat bucket, keeping `kept_count(size, density)` of each.

    Selecting per parameter, not per bucket, makes what is sent independent of how DDP groups
    parameters into buckets (which changes after the first iteration and after every restart), so a
    resumed run sends exactly what an uninterrupted one would.
    """
    indices, values, residuals, start = [], [], [], 0
    for size in sizes:
        i, v, r = select_topk(grad[start:start + size], residual[start:start + size], kept_count(size, density),
                              scale)
        indices.append(i + start)
        values.append(v)
        residuals.append(r)
        start += size
    return torch.cat(indices), torch.cat(values), torch.cat(residuals)


def topk_hook(state: TopKState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: exchanges the top-k entries of gradient + residual and returns their average."""
    grad = bucket.buffer()
    world = _group_size(state.process_group)
    numel, itemsize = grad.numel(), grad.element_size()
    dense = allreduce_bytes(numel, itemsize, world)
    sizes = [p.numel() for p in bucket.parameters()]
    k = sum(kept_count(size, state.density()) for size in sizes)
    idx_dtype = index_dtype(numel)
    sparse = allgather_bytes(k * (itemsize + idx_dtype.itemsize), world)
    state.dense_bytes += dense
    # Early in the warm-up, or on many ranks, gathering values and indices costs more than a plain
    # all-reduce; then the all-reduce is used, and any residual goes along with it.
    if sparse <= dense:  # on one rank both are 0: sparsify, so one rank trains as many would
        state.bytes_sent += sparse
        future = _sparse_average(state, bucket, sizes, k, idx_dtype, world)
    else:
        state.bytes_sent += dense
        future = _dense_average(state, bucket, world)
    if bucket.is_last():  # DDP reduces bucket 0 last: one synchronised step is complete
        state.step += 1
    return future


def _dense_average(state: TopKState, bucket, world: int) -> torch.futures.Future:
    grad = bucket.buffer()
    if state.residuals:
        scale = state.grad_scale
        accumulated = grad.float() / scale + state.bucket_residual(bucket)
        grad.copy_(accumulated * scale)
        state.keep_residual(bucket, accumulated - grad.float() / scale)  # zero for fp32, the rounding for 16-bit
    grad.div_(world)
    work = dist.all_reduce(grad, group=state.process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def _sparse_average(state: TopKState, bucket, sizes: list[int], k: int, idx_dtype: torch.dtype, world: int):
    grad = bucket.buffer()
    indices, values, residual = select_topk_per_parameter(grad, state.bucket_residual(bucket), sizes,
                                                          state.density(), state.grad_scale)
    state.keep_residual(bucket, residual)
    all_values = values.new_empty(world * k)
    all_indices = torch.empty(world * k, dtype=idx_dtype, device=grad.device)
    values_work = _all_gather_single(all_values, values, group=state.process_group, async_op=True)
    indices_work = _all_gather_single(all_indices, indices.to(idx_dtype), group=state.process_group,
                                      async_op=True)

    def average(_) -> torch.Tensor:
        indices_work.wait()
        total = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        # One rank at a time: within a rank the indices are unique, so every rank adds in the same
        # order and all replicas get bit-identical gradients (atomic adds of duplicates would not).
        for r in range(world):
            part = slice(r * k, (r + 1) * k)
            rank_indices = all_indices[part].long()
            total[rank_indices] += all_values[part].float()
        return total.div_(world).to(grad.dtype)

    return values_work.get_future().then(average)


# ---- PowerSGD ------------------------------------------------------------------------------------


class PowerSGDCompression(PowerSGDState, HookState):
    """PyTorch's PowerSGD state with this module's byte counters, loss-scale handling and checkpoints.

    `dense_steps` plain all-reduce steps come first (PyTorch's `start_powerSGD_iter`; at least 2, as
    PowerSGD needs DDP's buckets to be final before it keeps per-bucket memory).

    PyTorch keeps the error feedback and the Q matrices per DDP bucket, and DDP lays its buckets out
    anew after the first iteration of every run, a resumed one included. So the state is saved per
    parameter, and whenever a bucket arrives with parameters other than the ones its memory was
    built for, the memory is moved to the new layout (`_relayout`). Q starts from normals drawn per
    parameter (seeded by `seed`, its position and how often Q was redrawn), not per bucket as PyTorch
    draws them. So a resumed run compresses as the uninterrupted one, whatever the buckets.
    """

    def __init__(self, process_group=None, matrix_rank: int = 4, dense_steps: int = 100, **powersgd_options):
        super().__init__(process_group, matrix_approximation_rank=matrix_rank, start_powerSGD_iter=dense_steps,
                         **powersgd_options)
        self.bytes_sent = 0
        self.dense_bytes = 0
        self.positions: dict[int, int] = {}  # id(parameter) -> position; filled by register()
        self.layouts: dict[int, tuple[int, ...]] = {}  # bucket index -> positions its memory is laid out for
        self.shapes: dict[int, torch.Size] = {}
        self.loose: dict[int, dict] = {}  # position -> {"error", "q"} not yet placed in a bucket's memory
        self.error_scale = 1.0  # error_dict holds errors multiplied by this (the loss scale they came with)
        self.seed = int(self.rng.randint(2**31))  # PowerSGDState's own generator, seeded by random_seed
        self.draws = 0  # times Q was drawn afresh (after a skipped step)
        self._iter_before = 0

    # -- the trainer's protocol

    def begin_step(self, grad_scale: float = 1.0, may_skip: bool = False) -> None:
        super().begin_step(grad_scale, may_skip)
        self._iter_before = self.iter
        if self.grad_scale != self.error_scale:  # the loss scale moved: keep the errors' true size
            for error in self.error_dict.values():
                error.mul_(self.grad_scale / self.error_scale)
            self.error_scale = self.grad_scale

    def finish_step(self, applied: bool) -> None:
        """A skipped step put inf or NaN into the error feedback and Q: zero the one, redraw the other;
        the schedule stays where it was before the step, as top-k's does."""
        if applied or not self.may_skip:
            return
        for memory in (self.error_dict, self.p_memory_dict, self.q_memory_dict):
            memory.clear()
        self.layouts.clear()  # the next step lays every bucket out again, with new Q
        self.loose.clear()
        self.draws += 1
        self.iter = self._iter_before

    def state_dict(self) -> dict:
        per_parameter = {pos: dict(entry) for pos, entry in self.loose.items()}
        for index in self.layouts:
            per_parameter.update(self._split(index))
        return {"iter": self.iter, "bytes_sent": self.bytes_sent, "dense_bytes": self.dense_bytes,
                "seed": self.seed, "draws": self.draws,
                "per_parameter": {pos: {k: v for k, v in entry.items() if v is not None}
                                  for pos, entry in per_parameter.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.iter, self.bytes_sent, self.dense_bytes = state["iter"], state["bytes_sent"], state["dense_bytes"]
        self.seed, self.draws = state["seed"], state["draws"]
        self.error_dict.clear()
        self.p_memory_dict.clear()
        self.q_memory_dict.clear()
        self.layouts.clear()
        self.loose = {int(pos): {"error": entry.get("error"), "q": entry.get("q")}
                      for pos, entry in state["per_parameter"].items()}

    def resume_schedule(self, state: dict) -> str:
        """On another number of ranks: the schedule and Q (the same on every rank) carry over; the error
        feedback is this rank's own and restarts at zero."""
        self.load_state_dict(state)
        for entry in self.loose.values():
            entry["error"] = None
        return "PowerSGD error feedback is this rank's own, so it restarts at zero (Q and the schedule carry over)"

    # -- per-parameter form of the per-bucket memory

    def _compressed(self, position: int) -> tuple[int, int, int] | None:
        """(n, m, rank) of a parameter PowerSGD compresses as an n x m matrix, None for one it sends whole."""
        shape = self.shapes[position]
        n = shape[0] if len(shape) else 1
        m = math.prod(shape) // n
        rank = min(n, m, self.matrix_approximation_rank)
        return (n, m, rank) if _should_compress(n, m, rank, self.min_compression_rate)[0] else None

    def _q_order(self, layout: tuple[int, ...]) -> list[int]:
        """Positions of a bucket's compressed parameters in the order PyTorch lays out their Q: grouped
        by matrix shape, groups in order of first appearance."""
        groups: dict[tuple[int, int], list[int]] = {}
        for position in layout:
            nm = self._compressed(position)
            if nm:
                groups.setdefault(nm[:2], []).append(position)
        return [position for group in groups.values() for position in group]

    def _split(self, index: int) -> dict[int, dict]:
        """Bucket `index`'s memory per parameter: unscaled fp32 error, and Q as an m x rank matrix."""
        layout = self.layouts[index]
        out = {position: {"error": None, "q": None} for position in layout}
        error = self.error_dict.get(index)
        if error is not None:
            sizes = [math.prod(self.shapes[position]) for position in layout]
            for position, part in zip(layout, error.float().div(self.error_scale).split(sizes)):
                out[position]["error"] = part.clone()
        q = self.q_memory_dict.get(index)
        if q is not None and index in self.p_memory_dict:
            order = self._q_order(layout)
            sizes = [self._compressed(position)[1] * self._compressed(position)[2] for position in order]
            for position, part in zip(order, q.split(sizes)):
                out[position]["q"] = part.clone()
        return out

    def _relayout(self, index: int, layout: tuple[int, ...], like: torch.Tensor) -> None:
        """Builds bucket `index`'s memory for `layout` from the per-parameter form, first taking apart
        any memory laid out for these parameters (or this index) otherwise."""
        members = set(layout)
        for other, old in list(self.layouts.items()):
            if other == index or members.intersection(old):
                self.loose.update(self._split(other))
                del self.layouts[other]
                for memory in (self.error_dict, self.p_memory_dict, self.q_memory_dict):
                    memory.pop(other, None)
        entries = [self.loose.pop(position, {"error": None, "q": None}) for position in layout]
        self.layouts[index] = layout
        if any(entry["error"] is not None for entry in entries):
            self.error_dict[index] = torch.cat([
                (entry["error"].to(like.device) if entry["error"] is not None else
                 torch.zeros(math.prod(self.shapes[position]), device=like.device)) * self.error_scale
                for position, entry in zip(layout, entries)]).to(like.dtype)
        by_position = dict(zip(layout, entries))
        order = self._q_order(layout)
        if order:  # PowerSGD orthogonalises Q before each use
            self.q_memory_dict[index] = torch.cat([self._saved_or_fresh_q(position, by_position[position]["q"])
                                                   .to(like.device, like.dtype) for position in order])
            p_size = sum(self._compressed(position)[0] * self._compressed(position)[2] for position in order)
            self.p_memory_dict[index] = torch.empty(p_size, device=like.device, dtype=like.dtype)

    def _saved_or_fresh_q(self, position: int, saved: torch.Tensor | None) -> torch.Tensor:
        """A saved Q where it has this run's shape (m x rank: parallel.powersgd_rank may have changed), else fresh."""
        _, m, rank = self._compressed(position)
        return saved if saved is not None and saved.numel() == m * rank else self._fresh_q(position)

    def _fresh_q(self, position: int) -> torch.Tensor:
        """Standard normals for a parameter's Q (m x rank, flat), a function of seed, draws and position."""
        _, m, rank = self._compressed(position)
        generator = torch.Generator().manual_seed(seeding.mix(self.seed, self.draws, position))
        return torch.randn(m * rank, generator=generator)


def powersgd_sent_numel(state: PowerSGDState, bucket) -> int:
    """Elements PowerSGD all-reduces for this bucket on a compressed step: P (n x r) and Q (m x r) for
    each gradient it compresses as an n x m matrix, and the whole of the ones it leaves uncompressed
    (vectors, and matrices too small for low rank to pay), by PowerSGD's own test."""
    sent = 0
    for tensor in bucket.gradients():
        n = tensor.shape[0]
        m = tensor.numel() // n
        rank = min(n, m, state.matrix_approximation_rank)
        sent += (n + m) * rank if _should_compress(n, m, rank, state.min_compression_rate)[0] else n * m
    return sent


def powersgd_hook(state: PowerSGDCompression, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: PyTorch's `powerSGD_hook`, counting the bytes it sends."""
    grad = bucket.buffer()
    world = _group_size(state.process_group)
    dense = allreduce_bytes(grad.numel(), grad.element_size(), world)
    state.dense_bytes += dense
    if state.iter < state.start_powerSGD_iter:
        state.bytes_sent += dense
    else:
        state.bytes_sent += allreduce_bytes(powersgd_sent_numel(state, bucket), grad.element_size(), world)
        layout = tuple(state.positions[id(p)] for p in bucket.parameters())
        if state.layouts.get(bucket.index()) != layout:
            for position, p in zip(layout, bucket.parameters()):
                state.shapes[position] = p.shape
            state._relayout(bucket.index(), layout, grad)
    future = powerSGD_hook(state, bucket)
    if dist.get_backend(state.process_group) == "gloo":
        # PowerSGD starts its second all-reduce (Q) from the first one's callback. gloo matches
        # collectives by the order they are issued, and callbacks of different buckets may run in a
        # different order on each rank; finishing each bucket before the next keeps the order.
        future.wait()
    return future


# ---- one entry point -----------------------------------------------------------------------------

# method -> (state class, hook)
METHODS = {
    "topk": (TopKState, topk_hook),
    "powersgd": (PowerSGDCompression, powersgd_hook),
}


def register(ddp_model, method: str, process_group=None, **options):
    """Installs the `method` hook on a DistributedDataParallel model; returns its state, which has
    `bytes_sent` and `dense_bytes`. Options go to the state: `ratio`, `warmup_steps`, `start_density`,
    `dense_steps` for topk; `matrix_rank`, `dense_steps` (and PowerSGDState's own) for powersgd."""
    if method not in METHODS:
        raise ConfigError(f"unknown gradient compression '{method}'; valid methods: {', '.join(METHODS)}")
    make_state, hook = METHODS[method]
    state = make_state(process_group=process_group, **options)
    state.positions.update({id(p): i for i, p in enumerate(ddp_model.module.parameters())})
    ddp_model.register_comm_hook(state, hook)
    return state


def check_fsdp_compression(mesh, method: str) -> None:
    """Raises a ValueError for any compression under FSDP2, saying which configuration to use instead."""
    if method in (None, "none"):
        return
    layout = " x ".join(map(str, mesh.shape))
    if mesh.mesh_dim_names:
        layout += f" ({' x '.join(mesh.mesh_dim_names)})"
    raise ConfigError(
        f"parallel.comm_hook={method} is not supported with FSDP2 (this run's mesh: {layout}). FSDP2 "
        f"reduce-scatters gradients within each shard group, and this version does not compress "
        f"reduce-scatters; compression could only apply to the all-reduce across the replicate axis of an "
        f"HSDP (2D) mesh, which is not implemented either. Use parallel.strategy=ddp with "
        f"parallel.comm_hook={method}, or keep FSDP2/HSDP with parallel.comm_hook=none.")
