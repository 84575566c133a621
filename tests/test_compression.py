"""Gradient compression hooks: error feedback, the warm-up schedule, byte counts, and DDP on real gloo ranks.

The multi-rank checks share one spawn of two processes (a spawn costs seconds); each rank saves what it
saw and the tests below assert on it.
"""

import gc
import types

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from genfoundry.distributed import compression
from multiproc import run_ranks, worst_gradient_gap

WORLD = 2


# ---- single process ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_feedback_keeps_every_bit(dtype):
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(1000, generator=gen).to(dtype)
    residual = torch.randn(1000, generator=gen) * 0.1
    indices, values, new_residual = compression.select_topk(grad, residual, k=37)

    sent = torch.zeros(1000).index_put((indices,), values.float())
    assert values.dtype == dtype and new_residual.dtype == torch.float32
    assert torch.equal(sent + new_residual, grad.float() + residual)
    # The sent entries are the largest in magnitude.
    accumulated = (grad.float() + residual).abs()
    kept = torch.zeros(1000, dtype=torch.bool).index_fill(0, indices, True)
    assert accumulated[kept].min() >= accumulated[~kept].max()


@pytest.mark.timeout(30)
def test_residuals_are_kept_unscaled_whatever_the_loss_scale():
    """fp16 gradients arrive multiplied by the loss scale: the residual must not carry it, or a halved
    scale would weight the held-back gradient twice as much as the new one."""
    gen = torch.Generator().manual_seed(1)
    grad, residual = torch.randn(500, generator=gen), torch.randn(500, generator=gen) * 0.1
    plain = compression.select_topk(grad, residual, k=25)
    for scale in (2.0**16, 2.0**-3):
        indices, values, new_residual = compression.select_topk(grad * scale, residual, k=25, scale=scale)
        assert torch.equal(indices, plain[0]) and torch.equal(new_residual, plain[2])
        assert torch.equal(values, plain[1] * scale)  # sent as the gradient came: scaled


@pytest.mark.timeout(30)
def test_density_schedule_is_dense_then_geometric():
    state = compression.TopKState(ratio=0.01, warmup_steps=4, start_density=0.25, dense_steps=2)
    densities = [state.density(step) for step in range(8)]
    assert densities[:2] == [1.0, 1.0]
    expected = [0.25 * 0.04 ** (t / 4) for t in range(4)]
    assert densities[2:6] == pytest.approx(expected)
    assert densities[6:] == [0.01, 0.01]
    assert compression.TopKState(ratio=0.5, warmup_steps=0, dense_steps=0).density(0) == 0.5


@pytest.mark.timeout(30)
def test_byte_formulas():
    assert compression.allreduce_bytes(1000, 4, 1) == 0
    assert compression.allreduce_bytes(1000, 4, 2) == 4000
    assert compression.allreduce_bytes(1000, 2, 8) == 2 * 7 * 1000 * 2 // 8
    assert compression.allgather_bytes(80, 4) == 240
    assert compression.kept_count(100_000, 0.01) == 1000
    assert compression.kept_count(10, 1e-6) == 1


@pytest.mark.timeout(30)
def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="topk, powersgd"):
        compression.register(nn.Linear(2, 2), "qsgd")


@pytest.mark.timeout(30)
def test_fsdp_compression_is_refused_with_the_alternative():
    mesh = types.SimpleNamespace(shape=(2, 4), mesh_dim_names=("replicate", "shard"))
    compression.check_fsdp_compression(mesh, "none")
    with pytest.raises(ValueError, match="replicate axis") as error:
        compression.check_fsdp_compression(mesh, "topk")
    assert "reduce-scatter" in str(error.value) and "parallel.strategy=ddp" in str(error.value)


# ---- two gloo ranks ------------------------------------------------------------------------------


class Vector(nn.Module):
    """One flat parameter whose gradient is exactly the input: loss = sum(w * c)."""

    def __init__(self, n: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(n))

    def forward(self, c):
        return (self.w * c).sum()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def same_as_plain_ddp(rank):
    """ratio 1.0: the averaged gradients equal those of DDP's own all-reduce, bucket rebuild included."""
    plain = DDP(mlp(), bucket_cap_mb=0.002, gradient_as_bucket_view=True)
    hooked = DDP(mlp(), bucket_cap_mb=0.002, gradient_as_bucket_view=True)
    compression.register(hooked, "topk", ratio=1.0, warmup_steps=0)
    return worst_gradient_gap(plain, hooked, rank, steps=3)


def gradient(step, rank, n):
    """A per-rank drift plus noise: what each rank's backward produces at `step`."""
    drift = torch.linspace(-1, 1, n).roll(rank * 7)
    return drift + 0.5 * torch.randn(n, generator=torch.Generator().manual_seed(1000 * step + rank))


def error_feedback_over_steps(rank, n=2000, steps=(25, 100), dtype=torch.float32):
    """Sum of averaged updates after T steps, and this rank's sum of gradients and residual."""
    ddp = DDP(Vector(n).to(dtype))
    state = compression.register(ddp, "topk", ratio=0.01, warmup_steps=0, dense_steps=0)
    grads, updates, magnitudes, snapshots = torch.zeros(n), torch.zeros(n), torch.zeros(n), {}
    for step in range(max(steps)):
        c = gradient(step, rank, n).to(dtype)
        ddp.zero_grad()
        ddp(c).backward()
        grads += c
        updates += ddp.module.w.grad
        magnitudes += ddp.module.w.grad.abs()
        if step + 1 in steps:
            snapshots[step + 1] = {"grads": grads.clone(), "updates": updates.clone(),
                                   "magnitudes": magnitudes.clone(), "residual": state.residuals[0].clone()}  # the one parameter
    return snapshots


def counting_topk_hook(state, bucket):
    state.calls.append((state.step, bucket.is_last()))
    return compression.topk_hook(state, bucket)


def accumulation(rank, steps=5, micro=3):
    """no_sync() for micro - 1 micro-steps: the hook and the schedule advance once per optimizer step."""
    ddp = DDP(mlp(), bucket_cap_mb=0.002)
    state = compression.TopKState(ratio=0.05, warmup_steps=4, dense_steps=1)
    state.calls = []
    ddp.register_comm_hook(state, counting_topk_hook)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(rank)
    densities = []
    for _ in range(steps):
        for m in range(micro):
            x = torch.randn(4, 8, generator=gen)
            if m < micro - 1:
                with ddp.no_sync():
                    ddp(x).square().mean().backward()
            else:
                ddp(x).square().mean().backward()
        densities.append(state.density())
        optimizer.step()
        optimizer.zero_grad()
    params = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    return {"calls": state.calls, "step": state.step, "densities": densities, "params": params}


def byte_counts(rank, n=100_000):
    """Bytes per step through the warm-up: dense, then densities 0.25, 0.05, 0.01."""
    ddp = DDP(Vector(n))
    state = compression.register(ddp, "topk", ratio=0.01, warmup_steps=2, start_density=0.25, dense_steps=1)
    counts = []
    for step in range(4):
        ddp.zero_grad()
        ddp(gradient(step, rank, n)).backward()
        counts.append((state.bytes_sent, state.dense_bytes))
    return counts


def powersgd_run(rank):
    torch.manual_seed(0)
    ddp = DDP(nn.Linear(64, 64))
    state = compression.register(ddp, "powersgd", matrix_rank=2, dense_steps=2)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(rank)
    counts = []
    for _ in range(4):
        ddp(torch.randn(16, 64, generator=gen)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        counts.append((state.bytes_sent, state.dense_bytes))
    params = torch.cat([p.detach().flatten() for p in ddp.parameters()])
    return {"counts": counts, "params": params}


def skipped_steps(rank):
    """An fp16-style step that overflows on rank 1 only, skipped by both ranks (as the trainer agrees):
    top-k restores the residuals and schedule it had before; PowerSGD clears its error feedback and Q."""
    out = {}
    for method, options in (("topk", {"ratio": 0.05, "warmup_steps": 0, "dense_steps": 0}),
                            ("powersgd", {"matrix_rank": 2, "dense_steps": 2})):
        torch.manual_seed(0)
        ddp = DDP(nn.Linear(64, 64))
        state = compression.register(ddp, method, **options)
        gen = torch.Generator().manual_seed(rank)

        def step(scale, overflow=False):
            state.begin_step(scale, may_skip=True)
            ddp.zero_grad()
            loss = ddp(torch.randn(16, 64, generator=gen)).square().mean() * scale
            (loss * (float("inf") if overflow else 1.0)).backward()
            flag = torch.tensor([float(all(torch.isfinite(p.grad).all() for p in ddp.parameters()))])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
            state.finish_step(applied=bool(flag.item()))
            return bool(flag.item())

        for _ in range(3):
            assert step(1024.0)
        if method == "topk":
            before = {k: v.clone() for k, v in state.residuals.items()}, state.step
            out["topk_skipped"] = not step(1024.0, overflow=rank == 1)
            out["topk_restored"] = (all(torch.equal(before[0][k], v) for k, v in state.residuals.items())
                                    and state.step == before[1] and state.residuals.keys() == before[0].keys())
        else:
            iter_before = state.iter
            out["powersgd_had_memory"] = bool(state.error_dict) and bool(state.q_memory_dict)
            out["powersgd_skipped"] = not step(1024.0, overflow=rank == 1)
            out["powersgd_cleared"] = (not state.error_dict and not state.q_memory_dict and state.draws == 1
                                       and state.iter == iter_before)
        out[f"{method}_then_finite"] = step(512.0) and all(
            torch.isfinite(v).all() for v in (state.residuals.values() if method == "topk"
                                              else state.error_dict.values()))
    return out


def all_scenarios(rank, world, out_dir):
    torch.save({"skipped_steps": skipped_steps(rank),
                "same_as_plain_ddp": same_as_plain_ddp(rank),
                "error_feedback": error_feedback_over_steps(rank),
                "error_feedback_bf16": error_feedback_over_steps(rank, steps=(25,), dtype=torch.bfloat16),
                "accumulation": accumulation(rank),
                "bytes": byte_counts(rank),
                "powersgd": powersgd_run(rank)},
               f"{out_dir}/rank{rank}.pt")
    # DDP objects live in reference cycles; left to die at exit, after the process group is destroyed,
    # they abort the process now and then ("terminate called without an active exception").
    gc.collect()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("compression")
    run_ranks(all_scenarios, WORLD, str(out_dir), timeout=90)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def increments(counts):
    previous, result = (0, 0), []
    for sent, dense in counts:
        result.append((sent - previous[0], dense - previous[1]))
        previous = (sent, dense)
    return result


@pytest.mark.timeout(120)
def test_a_skipped_step_leaves_no_inf_in_the_error_feedback(ranks):
    for r in ranks:
        got = r["skipped_steps"]
        assert got["topk_skipped"] and got["topk_restored"] and got["topk_then_finite"], got
        assert got["powersgd_had_memory"] and got["powersgd_skipped"] and got["powersgd_cleared"], got
        assert got["powersgd_then_finite"], got


@pytest.mark.timeout(120)
def test_ratio_one_matches_plain_ddp(ranks):
    assert all(r["same_as_plain_ddp"] < 1e-6 for r in ranks)


@pytest.mark.timeout(120)
def test_error_feedback_loses_no_gradient(ranks):
    for steps in (25, 100):
        snaps = [r["error_feedback"][steps] for r in ranks]
        # Every rank received the same updates: the average of what all ranks sent.
        assert torch.equal(snaps[0]["updates"], snaps[1]["updates"])
        # What was sent plus what is still held back is exactly what the ranks computed.
        held_back = sum(s["grads"] - s["residual"] for s in snaps) / WORLD
        assert torch.allclose(snaps[0]["updates"], held_back, atol=1e-3)
    # Sending 1% per step, the averaged updates approach the averaged gradients as steps accumulate.
    def relative_gap(steps):
        snaps = [r["error_feedback"][steps] for r in ranks]
        true = sum(s["grads"] for s in snaps) / WORLD
        return ((snaps[0]["updates"] - true).norm() / true.norm()).item()

    assert relative_gap(100) < 0.6 * relative_gap(25)


@pytest.mark.timeout(120)
def test_error_feedback_with_bf16_gradients(ranks):
    snaps = [r["error_feedback_bf16"][25] for r in ranks]
    assert torch.equal(snaps[0]["updates"], snaps[1]["updates"])
    held_back = sum(s["grads"] - s["residual"] for s in snaps) / WORLD
    # Only the rounding of each step's averaged update to bf16 (at most 2^-8 of it) separates the two.
    assert ((snaps[0]["updates"] - held_back).abs() <= 2**-8 * snaps[0]["magnitudes"] + 1e-6).all()


@pytest.mark.timeout(120)
def test_accumulation_advances_the_schedule_once_per_optimizer_step(ranks):
    for r in ranks:
        acc = r["accumulation"]
        calls = acc["calls"]
        assert acc["step"] == 5
        assert sum(is_last for _, is_last in calls) == 5
        assert sorted({step for step, _ in calls}) == [0, 1, 2, 3, 4]
        state = compression.TopKState(ratio=0.05, warmup_steps=4, dense_steps=1)
        assert acc["densities"] == [state.density(s) for s in range(1, 6)]
    # Replicas stay bit-identical through sparse steps.
    assert torch.equal(ranks[0]["accumulation"]["params"], ranks[1]["accumulation"]["params"])


@pytest.mark.timeout(120)
def test_bytes_sent_through_the_warmup(ranks):
    dense = 100_000 * 4  # 2 ranks: a ring all-reduce sends 2 (p-1)/p n * 4 = 4n bytes
    # k entries of 4-byte values and 4-byte indices, gathered by p - 1 = 1 peer
    expected = [(dense, dense), (25_000 * 8, dense), (5_000 * 8, dense), (1_000 * 8, dense)]
    for r in ranks:
        steps = increments(r["bytes"])
        assert steps == expected
        assert steps[-1][1] / steps[-1][0] == 50  # the compression ratio once warmed up


@pytest.mark.timeout(120)
def test_powersgd_sends_less_than_dense(ranks):
    dense = (64 * 64 + 64) * 4
    compressed = (64 * 2 + 64 * 2 + 64) * 4  # P and Q of rank 2 for the weight; the bias as it is
    for r in ranks:
        assert increments(r["powersgd"]["counts"]) == [(dense, dense)] * 2 + [(compressed, dense)] * 2
    assert torch.equal(ranks[0]["powersgd"]["params"], ranks[1]["powersgd"]["params"])
