"""All-reduce timings on this machine's ranks, and the α–β cost model fitted to them and checked against them.

Times, for each message size: the flat `dist.all_reduce` (the backend's own choice of algorithm), the 2D
torus all-reduce on every rows x cols grid of this world size (rows, cols >= 2), and on NCCL the flat
all-reduce forced to ring and to tree. Then fits α and β (`costmodel.fit`), prints the algorithm the
model predicts fastest beside the one measured fastest, prints the simulator's table for 8 to 4096
ranks, and writes everything as JSON. Launch under torchrun; rank 0 prints and writes:

    torchrun --nproc-per-node=8 -m genfoundry.bench.comm --out comm.json

NCCL reads NCCL_ALGO when it creates a communicator, so each forced algorithm gets a process group of
its own, created and first used with the variable set, and the variable is restored after. On gloo no
fit is made: its reduce-scatter is emulated (see `genfoundry.distributed.torus`), so its timings would
mislead the model; they are still printed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from genfoundry import accel
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.distributed import costmodel, parallel, torus
from genfoundry.progress import bar

DEFAULT_SIZES = [4096 * 4**k for k in range(9)]  # 4 KiB ... 256 MiB
NCCL_ALGOS = ("Ring", "Tree")


def time_op(op, device: torch.device, iters: int, warmup: int) -> float:
    """Seconds per call of `op`, back to back after `warmup` calls, on the slowest rank."""
    for _ in range(warmup):
        op()
    accel.synchronize(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        op()
    accel.synchronize(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def forced_algorithm_group(algo: str, device: torch.device):
    """A process group of all ranks whose NCCL communicator was created under NCCL_ALGO=algo, or None
    where NCCL refuses the algorithm here."""
    previous = os.environ.get("NCCL_ALGO")
    os.environ["NCCL_ALGO"] = algo
    try:
        group = dist.new_group(list(range(accel.world_size())))
        dist.all_reduce(torch.zeros(1, device=device), group=group)  # creates the communicator now
        return group
    except (RuntimeError, dist.DistError):
        return None
    finally:
        if previous is None:
            os.environ.pop("NCCL_ALGO", None)
        else:
            os.environ["NCCL_ALGO"] = previous


def candidates(device: torch.device, backend: str) -> dict:
    """name -> function all-reducing a tensor in place, for every algorithm timed at this world size."""
    ops = {"flat": lambda x: dist.all_reduce(x)}
    for rows, cols in costmodel.torus_shapes(accel.world_size()):
        groups = torus.torus_groups(rows, cols)
        ops[costmodel.torus_name(rows, cols)] = lambda x, g=groups: torus.torus_all_reduce(x, g)
    if backend == "nccl":
        for algo in NCCL_ALGOS:
            group = forced_algorithm_group(algo, device)
            if group is not None:
                ops[algo.lower()] = lambda x, g=group: dist.all_reduce(x, group=g)
    return ops


def measure(ops: dict, sizes: list[int], device: torch.device, iters: int, warmup: int) -> dict:
    """name -> {bytes: seconds} for fp32 tensors of each size; a bar (rank 0) over the timings."""
    timings = {name: {} for name in ops}
    with bar(len(sizes) * len(ops), "bench comm", unit="timing") as shown:
        for n_bytes in sizes:
            x = torch.zeros(max(1, n_bytes // 4), dtype=torch.float32, device=device)  # zeros: sums stay finite
            for name, op in ops.items():
                timings[name][n_bytes] = time_op(functools.partial(op, x), device, iters, warmup)
                shown.update()
    return timings


def fit_params(timings: dict, world: int, backend: str, say) -> costmodel.Params | None:
    """α, β from the ring-forced all-reduce where there is one (it matches the ring formula), otherwise
    from the flat one; None on gloo."""
    if backend == "gloo":
        say("no α-β fit on gloo: its reduce-scatter is emulated by an all-reduce, and its collectives are "
            "not what the model describes, so a fit would be meaningless; timings above are for reference only")
        return None
    source = "ring" if "ring" in timings else "flat"
    try:
        params = costmodel.fit([(n, world, t) for n, t in timings[source].items()], algorithm="ring")
    except ValueError as e:
        say(f"no α-β fit: {e}")
        return None
    say(f"fitted from the {source} all-reduce: {params.describe()}")
    return params


def compare_choices(timings: dict, params: costmodel.Params | None, world: int, say) -> list[dict]:
    """At each size, the algorithm measured fastest and the one the cost model predicts."""
    say(f"{'message':>10}  {'measured fastest':<25}   predicted fastest")
    rows = []
    for n_bytes in next(iter(timings.values())):
        measured = costmodel.fastest({name: t[n_bytes] for name, t in timings.items()})
        predicted, predictions = costmodel.choose(n_bytes, world, params) if params else (None, {})
        guess = f"{predicted} ({costmodel.format_seconds(predictions[predicted])})" if predicted else "- (no fit)"
        say(f"{costmodel.format_bytes(n_bytes):>10}  {measured:<13}"
            f"{costmodel.format_seconds(timings[measured][n_bytes]):>12}   {guess}")
        rows.append({"bytes": n_bytes, "measured_fastest": measured, "predicted_fastest": predicted,
                     "predictions": predictions})
    return rows


def simulation_params(params: costmodel.Params | None, world: int, say) -> costmodel.Params:
    """The fitted figures where there are some; measured on one node they stand for the links inside
    a node, and the network's are taken from `costmodel.REFERENCE`."""
    if params is None:
        say(f"simulating with illustrative figures, not measured ones: {costmodel.REFERENCE.describe()}")
        return costmodel.REFERENCE
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local == world:
        params = costmodel.Params(alpha=costmodel.REFERENCE.alpha, beta=costmodel.REFERENCE.beta,
                                  intra_alpha=params.alpha, intra_beta=params.beta, ranks_per_node=world)
        say("simulating with the fitted figures inside a node and the illustrative network of costmodel.REFERENCE")
    return params


def run(sizes: list[int] | None = None, iters: int = 20, out: str | None = None, warmup: int = 3,
        device: str = "auto", worlds=tuple(2**k for k in range(3, 13))) -> dict:
    """Times, fits, compares and simulates (see the module docstring); every rank calls it."""
    sizes = sorted(sizes or DEFAULT_SIZES)
    dev = accel.get_device(device)
    if not parallel.init_process_group(dev, 600):
        raise SystemExit("the communication benchmark needs several ranks: launch it with torchrun --nproc-per-node=N")
    world, backend = accel.world_size(), accel.comm_backend(dev)
    say = print if accel.rank() == 0 else (lambda *a, **k: None)
    say(f"all-reduce on {world} ranks, {backend} on {accel.device_name(dev)}, torch {torch.__version__}; "
        f"fp32, {iters} timed calls per size after {warmup}")
    if backend == "gloo":
        say("note: on gloo the torus's reduce-scatter is emulated by an all-reduce within the row")
    ops = candidates(dev, backend)
    if backend == "nccl" and not {"ring", "tree"} <= set(ops):
        say(f"NCCL refused a forced algorithm here; timed: {', '.join(ops)}")
    timings = measure(ops, sizes, dev, iters, warmup)
    say(f"{'message':>10}" + "".join(f"{name:>15}" for name in timings))
    for n_bytes in sizes:
        say(f"{costmodel.format_bytes(n_bytes):>10}" +
            "".join(f"{costmodel.format_seconds(t[n_bytes]):>15}" for t in timings.values()))
    params = fit_params(timings, world, backend, say)
    choices = compare_choices(timings, params, world, say)
    simulation = costmodel.simulate(simulation_params(params, world, say), sizes, worlds, print_fn=say)
    result = {"format_version": 1, "benchmark": "comm", "backend": backend, "world_size": world,
              "device": accel.device_name(dev), "torch": torch.__version__, "iters": iters,
              "timings_s": {name: {str(n): t for n, t in per.items()} for name, per in timings.items()},
              "fit": None if params is None else {"alpha_s": params.alpha, "beta_s_per_byte": params.beta},
              "choices": choices, "simulation": simulation}
    if out and accel.rank() == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(Path(out), json.dumps(result, indent=2).encode())
    parallel.destroy_process_group()
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="message sizes in bytes (default 4 KiB to 256 MiB)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per algorithm and size")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before each timing")
    p.add_argument("--out", default=None, help="JSON file to write (rank 0)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    run(args.sizes, args.iters, args.out, args.warmup, args.device)


if __name__ == "__main__":
    main()
