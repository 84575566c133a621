"""Solvers, time grids and guidance schedules of genfoundry.sampling, against a flow with a known answer."""

import math
import subprocess
import sys

import pytest
import torch

from genfoundry.sampling import image_noise, solve
from genfoundry.sampling.generation import guided_velocity
from genfoundry.sampling.solvers import (GUIDANCE_SCHEDULES, SCHEDULES, SOLVERS, auto_shift, guidance_scale, steps_for,
                                         time_grid)


class GaussianFlow(torch.nn.Module):
    """The exact velocity E[eps - x0 | x_t] for data x0 ~ N(mu, s^2) in every value. Its probability-flow
    ODE maps the noise z at t = 1 to mu + s z at t = 0, so a solver's error is known exactly."""

    arch = type("Arch", (), {"num_classes": 1})

    def __init__(self, mu=0.3, s=0.5):
        super().__init__()
        self.mu, self.s = mu, s

    def forward(self, x, t, y, drop=None):
        t = t.view(-1, *([1] * (x.ndim - 1))).double()
        x = x.double()
        centred = x - (1 - t) * self.mu
        var = (1 - t) ** 2 * self.s ** 2 + t ** 2
        x0 = self.mu + (1 - t) * self.s ** 2 / var * centred
        return (t / var * centred - x0).float()


@pytest.fixture(scope="module")
def problem():
    z = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    flow = GaussianFlow()
    return flow, z, flow.mu + flow.s * z, torch.zeros(256, dtype=torch.long)


def error(problem, solver, nfe, schedule="uniform", shift=1.0):
    flow, z, exact, y = problem
    return (solve(flow, z, y, steps_for(solver, nfe), solver, schedule=schedule, shift=shift) - exact).abs().max().item()


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_every_grid_runs_from_noise_to_data(schedule, steps):
    ts = time_grid(schedule, steps, shift=3.0)
    assert len(ts) == steps + 1 and ts[0] == 1.0 and ts[-1] == 0.0
    assert all(a > b for a, b in zip(ts, ts[1:])), ts


def test_shift_moves_the_grid_towards_noise_and_one_is_uniform():
    assert time_grid("shift", 8, 1.0) == pytest.approx(time_grid("uniform", 8))
    assert all(a >= b for a, b in zip(time_grid("shift", 8, 3.0), time_grid("uniform", 8)))
    assert all(a <= b for a, b in zip(time_grid("shift", 8, 0.5), time_grid("uniform", 8)))
    assert auto_shift(4096) == 1.0 and auto_shift(3 * 64 * 64) == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("schedule", ["karras", "logsnr"])
def test_sigma_grids_are_dense_near_the_data(schedule):
    ts = time_grid(schedule, 10)
    sigmas = [t / (1 - t) for t in ts[1:-1]]
    assert sigmas[-1] == pytest.approx(0.002) and ts[-2] < 0.1 / 10  # the last steps are far below 1 / 10


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_solver_converges_on_every_grid(problem, solver, schedule):
    assert error(problem, solver, 64, schedule, 2.0) < 0.1
    assert error(problem, solver, 64, schedule, 2.0) < error(problem, solver, 8, schedule, 2.0)


def test_second_order_solvers_beat_euler_at_equal_evaluations(problem):
    euler16, euler32 = error(problem, "euler", 16), error(problem, "euler", 32)
    assert error(problem, "dpm++2m", 16) < euler16 / 4
    assert error(problem, "heun", 32) < euler32 / 4
    # second order: doubling the evaluations divides Heun's error by about four, Euler's by two
    assert error(problem, "heun", 32) / error(problem, "heun", 64) > 3
    assert 1.6 < euler32 / error(problem, "euler", 64) < 2.4


def test_evaluations_are_counted_as_the_solvers_spend_them():
    calls = []

    class Counting(GaussianFlow):
        def forward(self, x, t, y, drop=None):
            calls.append(x.shape[0])
            return super().forward(x, t, y)

    z, y = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    for name, solver in SOLVERS.items():
        for nfe in (1, 5, 8):
            calls.clear()
            steps = steps_for(name, nfe)
            solve(Counting(), z, y, steps, name)
            assert len(calls) == solver.evaluations(steps) <= max(nfe, 1), (name, nfe)


@pytest.mark.parametrize("schedule", list(GUIDANCE_SCHEDULES))
def test_guidance_schedules_keep_the_mean_weight(schedule):
    n = 10000
    mean = sum(guidance_scale(3.0, schedule, (i + 0.5) / n) for i in range(n)) / n
    assert mean == pytest.approx(3.0, rel=1e-3)
    assert guidance_scale(3.0, schedule, 0.5, interval=(0.6, 1.0)) == 1.0
    assert guidance_scale(1.0, schedule, 0.5) == 1.0


def test_linear_guidance_grows_towards_the_data():
    assert guidance_scale(3.0, "linear", 1.0) == 1.0 and guidance_scale(3.0, "linear", 0.0) == 5.0


def test_guidance_is_one_batched_call_and_none_where_the_weight_is_one():
    shapes = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, y, drop=None):
            shapes.append((x.shape[0], y.tolist()))
            return torch.where((y == 9).view(-1, 1, 1, 1), torch.zeros_like(x), torch.ones_like(x))

    x, y = torch.zeros(2, 1, 2, 2), torch.tensor([3, 4])
    v = guided_velocity(Spy(), x, 0.5, y, 2.5, null_class=9)
    assert shapes == [(4, [3, 4, 9, 9])]
    assert torch.equal(v, torch.full_like(x, 2.5))  # uncond 0 + 2.5 (cond 1 - uncond 0)
    shapes.clear()
    guided_velocity(Spy(), x, 0.5, y, 1.0, null_class=9)
    assert shapes == [(2, [3, 4])]


def test_noise_is_a_pure_function_of_seed_and_index():
    full = image_noise(range(64), (1, 8, 8), seed=3)
    assert full.dtype == torch.float32 and full.shape == (64, 1, 8, 8)
    torch.testing.assert_close(image_noise(torch.tensor([40, 2]), (1, 8, 8), seed=3), full[[40, 2]], rtol=0, atol=0)
    assert not torch.equal(image_noise([0], (1, 8, 8), seed=4), full[:1])
    assert abs(full.mean().item()) < 0.05 and abs(full.std().item() - 1) < 0.05
    assert full.flatten(1).corrcoef().fill_diagonal_(0).abs().max() < 0.5  # images are not copies


def test_solver_names_are_read_without_torch():
    """The config and the torch-free report read the registries: importing them must not load torch."""
    code = ("import sys; import genfoundry.sampling.solvers, genfoundry.config; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
