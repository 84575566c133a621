"""Process groups, batch splitting and `parallelize()`: everything parallel, applied from outside the model.

`parallelize` applies, in this order, activation checkpointing, `torch.compile` and DDP or FSDP2 to
the repeated blocks of a model (any `nn.ModuleList` of it); the model's code knows nothing of it.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import inspect
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from genfoundry import accel
from genfoundry.errors import ConfigError


def init_process_group(device: torch.device, timeout_s: float) -> bool:
    """Joins the process group torchrun describes (WORLD_SIZE > 1); False when running alone.

    The timeout bounds every collective: when a rank dies, the others fail within `timeout_s` instead
    of waiting for the default 10-30 minutes.
    """
    if accel.world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return accel.distributed()  # a group the caller made is the caller's to watch and tear down
    mod = accel.device_module(device)
    if mod is not None and hasattr(mod, "set_device"):
        mod.set_device(device)
    # NCCL checks for failed or stuck collectives in a watchdog; make it tear the process down.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(accel.comm_backend(device), timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    start_heartbeat()
    return True


# ---- telling a lost peer from a bug, and not waiting for one ------------------------------------
# gloo reports a dead peer as a plain RuntimeError ("Connection reset by peer"), the same type as a
# shape mismatch, so the error alone cannot say which it is. Each rank instead stamps a counter in the
# process group's store every second from a daemon thread; after an error, a rank whose counter stops
# moving (or a store that no longer answers: it lived in a rank that died) is a lost peer.
#
# The same thread watches one peer, the next rank, so that no rank waits `parallel.timeout_s` in a
# collective (NCCL's wait) or in work of its own for a rank that died: a counter still for LOST_AFTER_S
# is posted in the store, every rank reads that one key each beat, and all exit with one line naming
# the lost rank (under torchrun, its restart follows). Each rank reads two keys a beat, at any scale.

HEARTBEAT_S = 1.0
LOST_AFTER_S = 10.0
STORE_MISSES = 5  # beats in a row the store does not answer before this rank gives up on it
_heartbeat: dict = {}
_generation = [0]


def _store():
    return dist.distributed_c10d._get_default_store()


def start_heartbeat() -> None:
    """Starts this rank's stamping for the current process group (again, if an earlier group's ran).
    It stops with `destroy_process_group` or at exit, before the store goes away under it."""
    import threading

    stop_heartbeat()
    if accel.world_size() <= 1:
        return
    rank, world = accel.rank(), accel.world_size()
    # torchrun keeps its store across restarts, and one process may train several runs on one store:
    # each attempt's and each run's keys are their own
    _generation[0] += 1
    prefix = f"genfoundry/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{_generation[0]}/"
    store, key, stop = _store(), f"{prefix}alive/{rank}", threading.Event()
    store.add(key, 1)  # every rank's key exists before training starts
    peer = (rank + 1) % world
    watched = {"count": 0, "since": time.monotonic()}

    def stamp():
        misses = 0
        while not stop.wait(HEARTBEAT_S):
            try:
                store.add(key, 1)
                lost, misses = _watch(store, prefix, peer, watched), 0
            except Exception:  # noqa: BLE001 - the store went with the rank or launcher that held it
                misses, lost = misses + 1, None
                if misses < STORE_MISSES or stop.is_set() or _heartbeat.get("finished"):
                    continue
                who = "the process group's store (rank 0 or the launcher that held it)"
            else:
                who = f"rank {lost}"
            if lost is not None or misses >= STORE_MISSES:
                if stop.is_set() or _heartbeat.get("finished"):
                    return
                print(f"genfoundry: rank {rank} lost contact with {who} (no answer for "
                      f"{LOST_AFTER_S if lost is not None else STORE_MISSES * HEARTBEAT_S:g} s); exiting so that the "
                      f"run can resume from its last checkpoint", file=sys.stderr, flush=True)
                os._exit(1)

    thread = threading.Thread(target=stamp, name="genfoundry-heartbeat", daemon=True)
    thread.start()
    _heartbeat.update(stop=stop, thread=thread, store=store, world=world, rank=rank, prefix=prefix)


def _watch(store, prefix: str, peer: int, watched: dict) -> int | None:
    """One beat of the watch: the rank found lost (by this rank or a peer), else None."""
    lost = store.add(f"{prefix}lost", 0)
    if lost:
        return lost - 1
    count = store.add(f"{prefix}alive/{peer}", 0)
    now = time.monotonic()
    if count != watched["count"]:
        watched.update(count=count, since=now)
    elif now - watched["since"] > LOST_AFTER_S and not store.add(f"{prefix}finished/{peer}", 0):
        store.compare_set(f"{prefix}lost", "0", str(peer + 1))  # the first rank to see one names it
        return int(store.get(f"{prefix}lost")) - 1
    return None


def mark_finished() -> None:
    """This rank ended its work normally: the peer watching it must not take its silence for death."""
    if _heartbeat:
        _heartbeat["finished"] = True
        try:
            _heartbeat["store"].add(f"{_heartbeat['prefix']}finished/{_heartbeat['rank']}", 1)
        except Exception:  # noqa: BLE001 - nobody is left to tell
            pass


def stop_heartbeat() -> None:
    if _heartbeat:
        _heartbeat["stop"].set()
        _heartbeat["thread"].join(timeout=5)
        _heartbeat.clear()


atexit.register(stop_heartbeat)  # a daemon thread inside a store call at exit would abort the process


def lost_peers(wait_s: float = 3 * HEARTBEAT_S) -> list[int] | None:
    """Ranks that stopped stamping within `wait_s` without having failed themselves (a rank that
    failed marks itself first, and shows its own error); None when the store no longer answers (its
    host died); [] when every peer is alive or there is no heartbeat."""
    if not _heartbeat:
        return []
    store, me, prefix = _heartbeat["store"], _heartbeat["rank"], _heartbeat["prefix"]
    peers = [r for r in range(_heartbeat["world"]) if r != me]
    try:
        store.add(f"{prefix}failed/{me}", 1)
        before = {r: store.add(f"{prefix}alive/{r}", 0) for r in peers}
        time.sleep(wait_s)
        after = {r: store.add(f"{prefix}alive/{r}", 0) for r in peers}
        failed = {r for r in peers if store.add(f"{prefix}failed/{r}", 0)}
    except Exception:  # noqa: BLE001 - any failure to reach the store means its host is gone
        return None
    return [r for r in peers if after[r] == before[r] and r not in failed]


class PeerLostError(RuntimeError):
    """This rank lost another one (it died, or its communication failed); the message says which.
    The same command resumes the run from its last checkpoint."""


def peer_failure(error: BaseException) -> str | None:
    """Why `error` means this rank lost another one (a line to print), or None when it does not
    (then it is a bug and keeps its traceback).

    torch.distributed's own error types (DistError: backend, network and store errors, such as an
    aborted NCCL communicator or a collective past `parallel.timeout_s`) are communication failures
    by type. Any other RuntimeError during a distributed run counts only if the heartbeat shows a
    peer gone."""
    if not isinstance(error, RuntimeError) or not (_heartbeat or accel.distributed()):
        return None
    import time

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    lost = lost_peers()
    if lost is None:
        who = "rank 0 or the launcher (the process group's store, which one of them holds, no longer answers)"
    elif lost:
        who = "rank " + ", ".join(map(str, lost))
    elif isinstance(error, dist.DistError):
        who = "another rank"
    else:
        if accel.rank() == 0:  # rank 0 may host the store: let the peers finish their own check first
            time.sleep(3 * HEARTBEAT_S)
        return None
    return f"lost contact with {who} ({type(error).__name__}: {first})"


def raise_together(error: BaseException | None, others) -> None:
    """Every rank calls it after a step that can fail on some ranks only: all ranks raise or none does.
    A rank that failed raises its own `error`; the others raise `others(number_of_failed_ranks)`."""
    failed = int(accel.all_reduce(torch.tensor([0 if error is None else 1])).item())
    if error is not None:
        raise error
    if failed:
        raise others(failed)


def destroy_process_group() -> None:
    """Stops the heartbeat and ends every group. A finished trainer that is garbage but still in a
    reference cycle (its DDP reducer, its own gloo groups) is freed first: left to the interpreter's
    teardown, gloo's threads would release Python objects after the interpreter can no longer take
    them back, and the process would abort instead of exiting."""
    stop_heartbeat()
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- how a global batch is split ----------------------------------------------------------------


def nearest_multiples(value: int, unit: int) -> list[int]:
    below = (value // unit) * unit
    return [v for v in (below, below + unit) if v > 0]


def split_global_batch(global_batch: int, world: int, micro: int) -> int:
    """Accumulation steps such that global = micro x accumulation x world, or one clear error."""
    if global_batch % (micro * world):
        near = nearest_multiples(global_batch, micro * world)
        raise ConfigError(f"train.global_batch_size {global_batch} is not micro-batch {micro} x accumulation x "
                         f"{world} ranks for any accumulation; nearest valid global batch sizes: "
                         f"{' or '.join(map(str, near))}")
    return global_batch // (micro * world)


def micro_batch_candidates(global_batch: int, world: int, limit: int = 0) -> list[int]:
    """Micro-batch sizes that split a rank's share of the global batch exactly, largest first."""
    if global_batch % world:
        near = nearest_multiples(global_batch, world)
        raise ConfigError(f"train.global_batch_size {global_batch} does not split over {world} ranks; nearest "
                         f"valid global batch sizes: {' or '.join(map(str, near))}")
    per_rank = global_batch // world
    return [m for m in range(per_rank, 0, -1) if per_rank % m == 0 and (not limit or m <= limit)]


def find_micro_batch(try_micro, candidates: list[int], device: torch.device, print_fn=print) -> int:
    """The largest candidate for which `try_micro(m)` (a forward and backward pass) does not run out of
    memory, agreed by all ranks (the smallest any rank found)."""
    chosen = None
    i = 0
    while i < len(candidates):
        m = candidates[i]
        try:
            try_micro(m)
            chosen = m
            break
        except torch.OutOfMemoryError:
            print_fn(f"micro-batch {m} does not fit in accelerator memory; trying smaller")
            _free_memory(device)
            # Jump to the largest candidate at most half as big: a search in log steps, not one by one.
            i = next((j for j in range(i + 1, len(candidates)) if candidates[j] <= m // 2), len(candidates) - 1) \
                if m > 1 else len(candidates)
    _free_memory(device)
    agreed = int(accel.all_reduce(torch.tensor([chosen or 0]), "min").item())  # 0: some rank found none
    if not agreed:
        raise ConfigError("even a micro-batch of 1 does not fit in accelerator memory (on at least one rank); "
                          "use a smaller model, parallel.activation_checkpointing=true or parallel.strategy=fsdp")
    return agreed


def _free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    mod = accel.device_module(device)
    if mod is not None and hasattr(mod, "empty_cache"):
        mod.empty_cache()


# ---- parallelize ---------------------------------------------------------------------------------


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's ModuleLists: the units checkpointed, compiled and sharded."""
    return [block for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]


def checkpoint_activations(block: nn.Module) -> None:
    """Recomputes the block's activations in backward instead of storing them; parameter names stay."""
    from torch.utils.checkpoint import checkpoint

    forward = block.forward

    def checkpointed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def comm_bytes_per_step(model: nn.Module, strategy: str, world: int, accumulation: int) -> int | None:
    """Bytes one rank puts on the network per optimizer step for the gradients and weights, counted as
    ring collectives send them (the communication hooks count the same way): DDP all-reduces every
    gradient once, 2 (p - 1) / p of their bytes; FSDP2 all-gathers the weights for each forward and
    backward, (p - 1) / p each, and reduce-scatters the gradients once. None where not counted (HSDP),
    0 alone."""
    if world < 2:
        return 0
    payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    strategy = resolve_strategy(strategy, world)
    if strategy == "ddp":
        return 2 * (world - 1) * payload // world
    if strategy == "fsdp":
        return (2 * accumulation + 1) * (world - 1) * payload // world
    return None


def resolve_strategy(strategy: str, world: int) -> str:
    if strategy == "auto":
        return "ddp" if world > 1 else "none"
    return strategy


def parallelize(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """Applies activation checkpointing, compile and DDP / FSDP2 / HSDP as `cfg` (a ParallelConfig) says.

    Returns the module to train with (the same object for FSDP2, which shards in place; a DDP wrapper
    for DDP). Parameter names and the model's state_dict keys are unchanged by all of it.
    """
    world = accel.world_size()
    strategy = resolve_strategy(cfg.strategy, world)
    blocks = repeated_blocks(model)
    if cfg.activation_checkpointing:
        for block in blocks:
            checkpoint_activations(block)
    if cfg.compile and getattr(cfg, "compile_scope", "blocks") == "blocks":  # scope "loss": the trainer compiles
        for block in blocks:
            block.compile()
    if strategy == "none":
        if cfg.comm_hook != "none":
            raise ConfigError(f"parallel.comm_hook={cfg.comm_hook} needs DDP on several ranks; this run has "
                             f"{world} rank(s) and strategy '{strategy}'")
        return model
    if not accel.distributed():
        raise ConfigError(f"parallel.strategy={strategy} needs a process group; launch with torchrun or --nproc")
    if strategy == "ddp":
        return _ddp(model, cfg, device)
    return _fsdp(model, blocks, cfg, device, world, strategy)


def _ddp(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type != "cpu" and device.index is not None else None
    # Buffers are constants computed at construction (identical on every rank): nothing to broadcast.
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else {"broadcast_buffers": False})
    ddp = DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True, **sync)
    ddp.comm_state = None
    if cfg.comm_hook == "torus":
        from genfoundry.distributed import torus

        ddp.comm_state = torus.register(ddp, cfg.torus_rows or None)
    elif cfg.comm_hook in ("topk", "powersgd"):
        from genfoundry.distributed import compression

        options = ({"ratio": cfg.topk_ratio, "warmup_steps": cfg.topk_warmup_steps} if cfg.comm_hook == "topk"
                   else {"matrix_rank": cfg.powersgd_rank, "dense_steps": max(2, cfg.powersgd_warmup_steps)})
        ddp.comm_state = compression.register(ddp, cfg.comm_hook, **options)
    return ddp


def _fsdp(model: nn.Module, blocks: list[nn.Module], cfg, device: torch.device, world: int, strategy: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if strategy == "hsdp":
        replicate = cfg.replicate or max(1, world // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        if world % replicate:
            raise ConfigError(f"parallel.replicate={replicate} does not divide the {world} ranks")
        mesh = init_device_mesh(device.type, (replicate, world // replicate), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    if cfg.comm_hook == "torus":
        raise ConfigError("parallel.comm_hook=torus replaces DDP's all-reduce; FSDP2 reduce-scatters instead. "
                         "Use parallel.strategy=ddp with it")
    if cfg.comm_hook != "none":
        from genfoundry.distributed import compression

        compression.check_fsdp_compression(mesh, cfg.comm_hook)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.comm_state = None
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place, so there is none)."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Within this context, backward reduces gradients across ranks only if `enabled` (the last
    micro-batch of an accumulation); earlier micro-batches only accumulate locally."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the local shard of an FSDP2 DTensor, else the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_of(shard, full: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a full tensor, laid out as the DTensor `shard` is."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(shard.device), shard.device_mesh, shard.placements).to_local()
