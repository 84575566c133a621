"""2D ("torus") all-reduce over a rows x cols grid of ranks, and a DDP communication hook that uses it.

Rank r sits at row r // cols, column r % cols, so with torchrun's numbering a row is one node when
cols is the number of processes per node. An all-reduce of n elements runs in three phases:

1. reduce-scatter within the row: each of the `cols` ranks of a row ends up owning the row's sum of
   one n / cols chunk;
2. all-reduce within the column, on that chunk only: the `rows` ranks holding the same chunk sum it
   over the whole grid;
3. all-gather within the row: the row's ranks exchange their finished chunks.

Each rank sends the same bytes as in a flat ring all-reduce, 2 (p - 1) / p * n, but the slow links
between rows carry only the column phase, on n / cols elements, and the flat ring's 2 (p - 1) latency
steps become 2 (cols - 1) + 2 (rows - 1).

NCCL (and any backend other than gloo) runs the phases as native collectives. Gloo has no reduce-scatter
worth the name: torch 2.13 answers `reduce_scatter_single` with one all-reduce per chunk, and older
releases refuse it. So on gloo the first phase is emulated by an all-reduce of the whole buffer within
the row, after which each rank keeps its own chunk. That costs twice the first phase's bytes and makes
gloo timings of this algorithm useless for judging it; it exists so the code path can be tested on CPUs.
"""

# No `from __future__ import annotations`: DDP inspects a hook's annotations as objects and rejects strings.

import math

import torch
import torch.distributed as dist

from genfoundry import accel
from genfoundry.distributed.compression import HookState, allgather_bytes, allreduce_bytes
from genfoundry.errors import ConfigError

# torch 2.13 renamed these collectives; 2.11 has only the old names.
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ---- the grid ------------------------------------------------------------------------------------


def near_square(world: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == world and rows <= cols as close as possible to each other."""
    rows = max(d for d in range(1, math.isqrt(world) + 1) if world % d == 0)
    return rows, world // rows


def grid_shape(world: int, rows: int | None = None, cols: int | None = None) -> tuple[int, int]:
    """The rows x cols grid for `world` ranks: near-square when neither is given, the other inferred
    when one is; one ValueError when the product is not the world size."""
    if rows is None and cols is None:
        return near_square(world)
    if rows is None:
        rows = world // cols if cols and world % cols == 0 else 0
    elif cols is None:
        cols = world // rows if rows and world % rows == 0 else 0
    if rows < 1 or cols < 1 or rows * cols != world:
        given = f"{rows if rows else '?'} x {cols if cols else '?'}"
        suggestion = " x ".join(map(str, near_square(world)))
        raise ConfigError(f"a torus grid of rows x cols ranks must hold all {world} ranks; {given} does not "
                         f"(rows * cols must equal the world size; near-square for {world}: {suggestion})")
    return rows, cols


class TorusGroups:
    """This rank's place in a rows x cols grid and its two process groups: the row group (the `cols`
    ranks of its row, rank order = column) and the column group (the `rows` ranks of its column)."""

    def __init__(self, rows: int, cols: int, rank: int, row_group, col_group):
        self.rows, self.cols, self.rank = rows, cols, rank
        self.row, self.col = divmod(rank, cols)
        self.row_group, self.col_group = row_group, col_group

    @property
    def world(self) -> int:
        return self.rows * self.cols

    def __repr__(self) -> str:
        return f"TorusGroups({self.rows} x {self.cols}, rank {self.rank} at row {self.row}, column {self.col})"


def torus_groups(rows: int | None = None, cols: int | None = None) -> TorusGroups:
    """Builds the row and column groups of a rows x cols grid over the default process group.

    Every rank must call this, in the same order relative to its other `new_group` calls: each rank
    creates every row's and every column's group, as `dist.new_group` requires.
    """
    world, rank = accel.world_size(), accel.rank()
    rows, cols = grid_shape(world, rows, cols)
    row_groups = [dist.new_group([r * cols + c for c in range(cols)]) for r in range(rows)]
    col_groups = [dist.new_group([r * cols + c for r in range(rows)]) for c in range(cols)]
    row, col = divmod(rank, cols)
    return TorusGroups(rows, cols, rank, row_groups[row], col_groups[col])


# ---- the all-reduce ------------------------------------------------------------------------------


def uses_gloo(group, tensor: torch.Tensor) -> bool:
    """True where the collective on `tensor` goes through gloo (CPU tensors always do)."""
    return tensor.device.type == "cpu" or dist.get_backend(group) == "gloo"


def _padded_flat(tensor: torch.Tensor, cols: int) -> tuple[torch.Tensor, bool]:
    """A flat buffer of the tensor's elements, zero-padded to a multiple of `cols`, and whether it is a
    view of the tensor itself (contiguous and already a multiple: no copy in or out)."""
    numel = tensor.numel()
    padded_numel = math.ceil(numel / cols) * cols
    if tensor.is_contiguous() and padded_numel == numel:
        return tensor.view(-1), True
    # Padding values never reach the result (each position is reduced on its own), so zeros do for any op.
    flat = torch.zeros(padded_numel, dtype=tensor.dtype, device=tensor.device)
    flat[:numel].copy_(tensor.reshape(-1))
    return flat, False


def reduce_scatter_row(flat: torch.Tensor, groups: TorusGroups, op=dist.ReduceOp.SUM,
                       emulate: bool | None = None) -> torch.Tensor:
    """Phase 1: the row's reduction of this rank's chunk (chunk `col` of `flat`), as a new tensor.

    `emulate` (default: on gloo only) replaces the reduce-scatter by an all-reduce of the row.
    """
    chunk = flat.numel() // groups.cols
    if emulate is None:
        emulate = uses_gloo(groups.row_group, flat)
    if emulate:
        dist.all_reduce(flat, op=op, group=groups.row_group)  # the emulation: see the module docstring
        return flat[groups.col * chunk:(groups.col + 1) * chunk].clone()
    shard = flat.new_empty(chunk)
    _reduce_scatter_single(shard, flat, op=op, group=groups.row_group)
    return shard


def torus_all_reduce(tensor: torch.Tensor, groups: TorusGroups, op=dist.ReduceOp.SUM,
                     emulate: bool | None = None) -> torch.Tensor:
    """All-reduces `tensor` (any shape and size) in place over the grid; returns it.

    The result equals `dist.all_reduce(tensor, op)` up to the order of the additions (bit-equal for
    integers). `op` must be element-wise; gloo has no AVG, so divide a SUM instead. `emulate`: see
    `reduce_scatter_row`.
    """
    if tensor.numel() == 0 or groups.world == 1:
        return tensor
    flat, in_place = _padded_flat(tensor, groups.cols)
    shard = reduce_scatter_row(flat, groups, op, emulate) if groups.cols > 1 else flat
    if groups.rows > 1:
        dist.all_reduce(shard, op=op, group=groups.col_group)
    if groups.cols > 1:
        _all_gather_single(flat, shard, group=groups.row_group)
    if not in_place:
        tensor.copy_(flat[:tensor.numel()].view(tensor.shape))
    return tensor


def torus_bytes(numel: int, itemsize: int, groups: TorusGroups, emulated: bool = False) -> int:
    """Bytes one rank sends in `torus_all_reduce` of `numel` elements, by the ring formula of each phase:
    reduce-scatter and all-gather within the row (cols - 1) * chunk each, the column's all-reduce
    2 (rows - 1) / rows * chunk, with chunk = ceil(numel / cols) elements. `emulated` counts gloo's
    first phase as what it is, an all-reduce of the whole padded row buffer."""
    chunk = math.ceil(numel / groups.cols)
    chunk_bytes = chunk * itemsize
    if emulated:
        scatter = allreduce_bytes(chunk * groups.cols, itemsize, groups.cols)
    else:
        scatter = allgather_bytes(chunk_bytes, groups.cols)  # a ring reduce-scatter moves what an all-gather does
    column = allreduce_bytes(chunk, itemsize, groups.rows)
    gather = allgather_bytes(chunk_bytes, groups.cols)
    return scatter + column + gather


# ---- the DDP communication hook ------------------------------------------------------------------


class TorusState(HookState):
    """What the torus hook keeps: the grid's groups, and `bytes_sent`, the bytes this rank has sent
    for gradients so far (cumulative; `torus_bytes` per bucket)."""

    def __init__(self, groups: TorusGroups):
        self.groups = groups
        self.bytes_sent = 0
        self._side_streams: dict = {}

    def side_stream(self, device: torch.device):
        """One CUDA stream per device for the hook's collectives, created on first use."""
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]


def _average(grad: torch.Tensor, groups: TorusGroups) -> None:
    # Dividing first, as DDP's own hook does, keeps fp16 sums of many ranks from overflowing.
    grad.div_(groups.world)
    torus_all_reduce(grad, groups)


def _average_on_side_stream(state: TorusState, grad: torch.Tensor) -> torch.futures.Future:
    """The average on a stream of its own, so the backward pass goes on computing the next buckets'
    gradients meanwhile; the returned future makes DDP's stream wait for it, not the CPU."""
    stream = state.side_stream(grad.device)
    stream.wait_stream(torch.cuda.current_stream(grad.device))  # the gradients were written there
    with torch.cuda.stream(stream):
        _average(grad, state.groups)
        future = torch.futures.Future(devices=[grad.device])
        future.set_result(grad)  # records an event on `stream` for whoever waits on the future
    return future


def torus_hook(state: TorusState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the bucket's gradients averaged over all ranks by `torus_all_reduce`."""
    grad = bucket.buffer()
    emulated = state.groups.cols > 1 and uses_gloo(state.groups.row_group, grad)
    state.bytes_sent += torus_bytes(grad.numel(), grad.element_size(), state.groups, emulated)
    if grad.device.type == "cuda":
        return _average_on_side_stream(state, grad)
    _average(grad, state.groups)
    future = torch.futures.Future()
    future.set_result(grad)
    return future


def register(ddp_model, rows: int | None = None, cols: int | None = None) -> TorusState:
    """Installs the torus hook on a DistributedDataParallel model over a rows x cols grid (near-square
    when neither is given); returns its state, whose `bytes_sent` the trainer reports per step.

    Every rank must call it (it creates process groups).
    """
    state = TorusState(torus_groups(rows, cols))
    ddp_model.register_comm_hook(state, torus_hook)
    return state
