"""An α–β (latency–bandwidth) cost model of all-reduce: ring, tree and 2D torus; fit, choose, simulate.

A message step costs α seconds, a byte on a link β seconds. For an all-reduce of n bytes over p ranks:

- ring: 2 (p - 1) α + 2 (p - 1) / p · n β. A reduce-scatter then an all-gather, p - 1 steps each, every
  step moving n / p bytes.
- tree: 2 ⌈log2 p⌉ α + 2 n β. NCCL's double binary tree reduces towards a root and broadcasts back,
  pipelined in chunks, with half the data on each of two trees so every rank is a leaf in one and has
  two children in the other. Pipelining hides the depth in the bandwidth term, so the latency is one
  trip up and one down (2 log2 p steps); each rank receives and sends about n bytes in each direction,
  so the bandwidth term is about 2 n β, against the ring's 2 (p - 1) / p · n β: the tree pays at most
  2 n β / p more in bandwidth to save 2 (p - 1 - log2 p) α in latency.
- torus (rows × cols, `genfoundry.distributed.torus`): a ring reduce-scatter within the row,
  (cols - 1) α + (cols - 1) / cols · n β; a ring all-reduce within the column on n / cols bytes,
  2 (rows - 1) α + 2 (rows - 1) / rows · (n / cols) β; a ring all-gather within the row, as the
  reduce-scatter.

Links: `Params` holds α and β of the network between nodes and, optionally, of the faster links inside
a node (NVLink). A collective whose ranks all lie in one node (consecutive ranks, `ranks_per_node` to a
node) runs on the fast links; any other is paced by the network, its slowest link. So a torus whose rows
are nodes does its two row phases on NVLink and sends only n / cols bytes per rank over the network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls


@dataclass(frozen=True)
class Params:
    """α (s per step) and β (s per byte) of the network, and optionally of the links inside a node."""

    alpha: float
    beta: float
    intra_alpha: float | None = None
    intra_beta: float | None = None
    ranks_per_node: int = 1

    def link(self, within_node: bool) -> tuple[float, float]:
        """(α, β) pacing a collective whose ranks do or do not all sit in one node."""
        if within_node and self.intra_alpha is not None and self.intra_beta is not None:
            return self.intra_alpha, self.intra_beta
        return self.alpha, self.beta

    def describe(self) -> str:
        text = f"α {self.alpha * 1e6:.2f} µs, 1/β {1 / self.beta / 1e9:.2f} GB/s"
        if self.intra_alpha is not None:
            text = (f"network {text}; inside a node of {self.ranks_per_node} ranks "
                    f"α {self.intra_alpha * 1e6:.2f} µs, 1/β {1 / self.intra_beta / 1e9:.2f} GB/s")
        return text


# Illustrative, not measured: 8 GPUs per node on NVLink, a 200 Gb/s network port per GPU.
REFERENCE = Params(alpha=10e-6, beta=1 / 25e9, intra_alpha=3e-6, intra_beta=1 / 400e9, ranks_per_node=8)


# ---- formulas ------------------------------------------------------------------------------------


def ring_time(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Ring all-reduce: 2 (p - 1) α + 2 (p - 1) / p · n β."""
    return 2 * (p - 1) * alpha + 2 * (p - 1) / p * n_bytes * beta


def tree_time(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Pipelined double-binary-tree all-reduce: 2 ⌈log2 p⌉ α + 2 n β (0 on one rank)."""
    if p <= 1:
        return 0.0
    return 2 * math.ceil(math.log2(p)) * alpha + 2 * n_bytes * beta


def ring_half_time(n_bytes: float, p: int, alpha: float, beta: float) -> float:
    """Ring reduce-scatter (or all-gather) of n bytes in all: (p - 1) α + (p - 1) / p · n β."""
    return (p - 1) * alpha + (p - 1) / p * n_bytes * beta


def torus_time(n_bytes: float, rows: int, cols: int, params: Params) -> float:
    """Reduce-scatter within the row, all-reduce of n / cols within the column, all-gather within the row."""
    node = params.ranks_per_node
    row_alpha, row_beta = params.link(within_node=node % cols == 0)
    col_alpha, col_beta = params.link(within_node=rows * cols <= node)
    return (2 * ring_half_time(n_bytes, cols, row_alpha, row_beta)
            + ring_time(n_bytes / cols, rows, col_alpha, col_beta))


def flat_link(world: int, params: Params) -> tuple[float, float]:
    return params.link(within_node=world <= params.ranks_per_node)


def torus_shapes(world: int) -> list[tuple[int, int]]:
    """Every rows x cols grid of `world` ranks with at least two rows and two columns."""
    return [(r, world // r) for r in range(2, world // 2 + 1) if world % r == 0]


def torus_name(rows: int, cols: int) -> str:
    return f"torus {rows}x{cols}"


def predict(n_bytes: float, world: int, params: Params, shapes=None) -> dict[str, float]:
    """Predicted seconds of each algorithm: ring, tree and the torus on each of `shapes` (default: all)."""
    alpha, beta = flat_link(world, params)
    predictions = {"ring": ring_time(n_bytes, world, alpha, beta), "tree": tree_time(n_bytes, world, alpha, beta)}
    for rows, cols in torus_shapes(world) if shapes is None else shapes:
        predictions[torus_name(rows, cols)] = torus_time(n_bytes, rows, cols, params)
    return predictions


def choose(n_bytes: float, world: int, params: Params, shapes=None) -> tuple[str, dict[str, float]]:
    """The predicted-fastest algorithm for an all-reduce of `n_bytes` on `world` ranks, and all predictions."""
    predictions = predict(n_bytes, world, params, shapes)
    return fastest(predictions), predictions


def fastest(predictions: dict[str, float]) -> str:
    """The fastest key; among ties (equal up to rounding) the first, so that grids of one cost, such as
    2x4 and 4x2 on uniform links, do not take turns by rounding error."""
    best = min(predictions.values())
    return next(name for name, t in predictions.items() if t <= best * (1 + 1e-9))


# ---- fitting -------------------------------------------------------------------------------------

# algorithm -> (coefficient of α, coefficient of β) for n bytes on p ranks
FEATURES = {
    "ring": lambda n, p: (2 * (p - 1), 2 * (p - 1) / p * n),
    "tree": lambda n, p: (2 * math.ceil(math.log2(p)), 2 * n),
}


def fit(measurements, algorithm: str = "ring") -> Params:
    """α and β by least squares from (message bytes, world size, seconds) of one algorithm's all-reduces.

    Errors are weighted relative to each time: a plain fit would let the largest messages decide alone
    and leave α, seconds of a few microseconds, to noise. Both are kept non-negative.
    """
    rows = [(*FEATURES[algorithm](n, p), t) for n, p, t in measurements if p > 1 and t > 0]
    a = np.array([[x, y] for x, y, _ in rows], dtype=np.float64).reshape(-1, 2)
    t = np.array([time for *_, time in rows], dtype=np.float64)
    if len(rows) < 2 or np.linalg.matrix_rank(a / a.max(axis=0)) < 2:
        raise ValueError("fitting α and β needs measurements of at least two message sizes on more than one rank")
    # Scaling the columns keeps the solver well conditioned: α-terms are ~1e-5 s, β-terms ~1e-10 s/byte.
    weighted = a / t[:, None]
    scale = weighted.max(axis=0)
    solution, _ = nnls(weighted / scale, np.ones_like(t))
    alpha, beta = solution / scale
    return Params(alpha=float(alpha), beta=float(beta))


# ---- the simulator -------------------------------------------------------------------------------


def crossovers(params: Params, world: int, sizes, shapes=None) -> list[tuple[float, str, str]]:
    """(bytes, faster below, faster above) wherever the chosen algorithm changes between `sizes`,
    located by bisection on the message size between the two sizes that bracket it."""
    sizes = sorted(sizes)
    choices = [choose(n, world, params, shapes)[0] for n in sizes]
    found = []
    for (lo, below), (hi, above) in zip(zip(sizes, choices), zip(sizes[1:], choices[1:])):
        if below == above:
            continue
        for _ in range(100):  # in log space: sizes span many orders of magnitude
            mid = math.sqrt(lo * hi)
            if choose(mid, world, params, shapes)[0] == below:
                lo = mid
            else:
                hi = mid
        found.append((hi, below, choose(hi, world, params, shapes)[0]))
    return found


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{n:.4g} B"


def format_seconds(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t >= 1e-3 else f"{t * 1e6:.1f} µs"


def simulate(params: Params, sizes, worlds=tuple(2**k for k in range(3, 13)), shapes_for=None,
             print_fn=print) -> dict:
    """Prints predicted all-reduce times for each world size and message size, and the crossovers.

    `shapes_for(world)` gives the torus grids considered (default: all of `torus_shapes`). Returns
    {"rows": [...], "crossovers": {world: [...]}} for JSON.
    """
    shapes_for = shapes_for or torus_shapes
    print_fn(f"predicted all-reduce times ({params.describe()})")
    print_fn(f"{'ranks':>6} {'bytes':>10} {'ring':>11} {'tree':>11} {'best torus':>22}  fastest")
    table, found = [], {}
    for world in worlds:
        shapes = shapes_for(world)
        for n in sizes:
            best, predictions = choose(n, world, params, shapes)
            tori = {k: v for k, v in predictions.items() if k.startswith("torus")}
            torus = fastest(tori) if tori else None
            torus_text = f"{format_seconds(tori[torus])} ({torus[6:]})" if torus else "-"
            print_fn(f"{world:>6} {format_bytes(n):>10} {format_seconds(predictions['ring']):>11} "
                     f"{format_seconds(predictions['tree']):>11} {torus_text:>22}  {best}")
            table.append({"world": world, "bytes": n, "fastest": best, "predictions": predictions})
        found[world] = crossovers(params, world, sizes, shapes)
    print_fn("crossovers (message size where the fastest algorithm changes):")
    for world, points in found.items():
        text = "; ".join(f"{a} -> {b} at {format_bytes(n)}" for n, a, b in points) or "none in this range"
        print_fn(f"{world:>6} ranks: {text}")
    return {"rows": table, "crossovers": {str(w): [list(c) for c in pts] for w, pts in found.items()}}
