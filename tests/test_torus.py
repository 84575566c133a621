"""The 2D (torus) all-reduce and its DDP hook, against flat `dist.all_reduce` and plain DDP on real gloo ranks.

One spawn per world size (4 ranks as 2 x 2, 6 ranks as 2 x 3 and 3 x 2) runs every multi-rank check;
each rank saves what it saw and the tests below assert on it. The DDP checks run on 4 ranks only: the
first DDP model of a process imports torch._dynamo, seconds of CPU per rank.
"""

import gc

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from genfoundry.distributed import torus
from multiproc import run_ranks, worst_gradient_gap

SIZES = (1, 7, 1001, 4096)  # 7 and 1001 divide by neither 2 nor 3
GRIDS = {4: [(2, 2)], 6: [(2, 3), (3, 2)]}
DDP_WORLD = 4


# ---- single process ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_grid_shapes():
    assert torus.near_square(16) == (4, 4)
    assert torus.near_square(6) == (2, 3)
    assert torus.near_square(12) == (3, 4)
    assert torus.near_square(7) == (1, 7)
    assert torus.grid_shape(8) == (2, 4)
    assert torus.grid_shape(8, rows=4) == (4, 2)
    assert torus.grid_shape(8, cols=8) == (1, 8)
    assert torus.grid_shape(6, 3, 2) == (3, 2)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("rows, cols", [(4, 2), (4, None), (None, 4), (0, 6)])
def test_grid_that_does_not_hold_the_world_is_one_clear_error(rows, cols):
    with pytest.raises(ValueError, match="must hold all 6 ranks.*near-square for 6: 2 x 3"):
        torus.grid_shape(6, rows, cols)


def grid(rows, cols):
    return torus.TorusGroups(rows, cols, 0, None, None)


@pytest.mark.timeout(30)
def test_bytes_equal_the_flat_ring_and_count_padding_and_emulation():
    # With native collectives, each rank sends what a flat ring all-reduce sends: 2 (p - 1) / p * n.
    for rows, cols in [(2, 2), (2, 4), (4, 2), (1, 8), (8, 1), (3, 5)]:
        p = rows * cols
        assert torus.torus_bytes(p * 1000, 4, grid(rows, cols)) == 2 * (p - 1) * 1000 * 4
    # 77 fp32 elements on 2 x 3: chunks of 26 (78 padded); gloo's first phase is an all-reduce of the row.
    native = 2 * 26 * 4 + 2 * 1 * 26 * 4 // 2 + 2 * 26 * 4  # reduce-scatter, column all-reduce, all-gather
    assert torus.torus_bytes(77, 4, grid(2, 3)) == native == 520
    emulated = 2 * 2 * 78 * 4 // 3 + 104 + 208
    assert torus.torus_bytes(77, 4, grid(2, 3), emulated=True) == emulated == 728


# ---- on real ranks -------------------------------------------------------------------------------


def int_tensor(rank, numel, seed=0):
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    return torch.randint(-2**40, 2**40, (numel,), generator=gen, dtype=torch.int64)


def compare_collectives(rank, groups) -> dict:
    """For each check, whether the torus result matched flat all_reduce (bool) or by how much (float)."""
    seen = {}
    for numel in SIZES:
        for emulate in (None, False):  # False: the native reduce-scatter path, which torch 2.13's gloo runs
            x = int_tensor(rank, numel, seed=numel)
            expected = x.clone()
            dist.all_reduce(expected)
            try:
                torus.torus_all_reduce(x, groups, emulate=emulate)
            except (RuntimeError, NotImplementedError) as e:
                seen[("int64", numel, emulate)] = f"unsupported: {e}"
                continue
            seen[("int64", numel, emulate)] = torch.equal(x, expected)
    # Any shape; a non-contiguous view is reduced in place too.
    gen = torch.Generator().manual_seed(rank)
    for name, x in [("float32 3x5x7", torch.randn(3, 5, 7, generator=gen)),
                    ("float32 transposed", torch.randn(11, 13, generator=gen).t())]:
        expected = x.clone()
        dist.all_reduce(expected)
        torus.torus_all_reduce(x, groups)
        seen[name] = (x - expected).abs().max().item()
    x = int_tensor(rank, 1001).view(7, 11, 13)
    expected = x.clone()
    dist.all_reduce(expected, op=dist.ReduceOp.MAX)
    seen["int64 max"] = torch.equal(torus.torus_all_reduce(x, groups, op=dist.ReduceOp.MAX), expected)
    return seen


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 13), nn.ReLU(), nn.Linear(13, 3))


def ddp_gradients(rank, rows, cols) -> dict:
    """Gradients of plain DDP and of DDP with the torus hook, with small buckets, over two steps."""
    plain = DDP(mlp(), bucket_cap_mb=0.0002)
    hooked = DDP(mlp(), bucket_cap_mb=0.0002)
    state = torus.register(hooked, rows, cols)
    worst = worst_gradient_gap(plain, hooked, rank, steps=2)
    # One bucket of 77 fp32 gradients: the byte count of a step is known by hand.
    single = DDP(nn.Linear(10, 7))
    single_state = torus.register(single, rows, cols)
    counts = []
    for _ in range(2):
        single(torch.randn(4, 10, generator=torch.Generator().manual_seed(rank))).sum().backward()
        counts.append(single_state.bytes_sent)
    return {"worst": worst, "bytes_sent": state.bytes_sent, "single_bucket_bytes": counts}


def all_checks(rank, world, out_dir):
    results = {}
    for rows, cols in GRIDS[world]:
        groups = torus.torus_groups(rows, cols)
        results[(rows, cols)] = {"where": (groups.row, groups.col), "collectives": compare_collectives(rank, groups)}
        if world == DDP_WORLD:
            results[(rows, cols)]["ddp"] = ddp_gradients(rank, rows, cols)
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    gc.collect()  # DDP objects must go before the process group does


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """A function world -> each rank's results, spawning the ranks on first use only."""
    cache = {}

    def results(world):
        if world not in cache:
            out_dir = tmp_path_factory.mktemp(f"torus{world}")
            run_ranks(all_checks, world, str(out_dir), timeout=100)
            cache[world] = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
        return cache[world]

    return results


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", GRIDS)
def test_grid_positions(spawned, world):
    for rows, cols in GRIDS[world]:
        assert [r[(rows, cols)]["where"] for r in spawned(world)] == [divmod(rank, cols) for rank in range(world)]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", GRIDS)
def test_integer_sums_are_bit_equal_to_flat_all_reduce(spawned, world):
    for r in spawned(world):
        for shape in GRIDS[world]:
            seen = r[shape]["collectives"]
            for numel in SIZES:
                assert seen[("int64", numel, None)] is True, (shape, numel)
            assert seen["int64 max"] is True


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", GRIDS)
def test_native_reduce_scatter_path(spawned, world):
    native = [r[shape]["collectives"][("int64", numel, False)] for r in spawned(world) for shape in GRIDS[world]
              for numel in SIZES]
    refused = [v for v in native if isinstance(v, str)]
    if refused:
        pytest.skip(f"this torch's gloo has no reduce-scatter: {refused[0]}")
    assert all(v is True for v in native)


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world", GRIDS)
def test_float_tensors_of_any_shape(spawned, world):
    for r in spawned(world):
        for shape in GRIDS[world]:
            seen = r[shape]["collectives"]
            assert seen["float32 3x5x7"] < 1e-5
            assert seen["float32 transposed"] < 1e-5


@pytest.mark.timeout(150)
def test_ddp_hook_gives_plain_ddp_gradients_and_counts_bytes(spawned):
    for rows, cols in GRIDS[DDP_WORLD]:
        chunk = -(-77 // cols)
        # gloo: the row all-reduces all of its padded buffer, then column all-reduce and row all-gather
        step = (2 * (cols - 1) * chunk * cols * 4 // cols + 2 * (rows - 1) * chunk * 4 // rows
                + (cols - 1) * chunk * 4)
        for r in spawned(DDP_WORLD):
            ddp = r[(rows, cols)]["ddp"]
            assert ddp["worst"] < 1e-6
            assert ddp["bytes_sent"] > 0
            assert ddp["single_bucket_bytes"] == [step, 2 * step]
