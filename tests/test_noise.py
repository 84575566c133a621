"""Counter-based training noise: right distribution, a pure function of each sample's key."""

import torch

from genfoundry.diffusion import FlowMatching
from genfoundry.diffusion.noise import keyed_normal, keyed_uniform


def test_keyed_normals_have_standard_moments_and_no_correlation():
    z = keyed_normal(range(512), (4, 16, 16), "cpu")
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs((z**3).mean()) < 0.03 and abs((z**4).mean() - 3) < 0.06
    flat = z.flatten(1)[:64]
    off_diagonal = torch.corrcoef(flat)[~torch.eye(64, dtype=torch.bool)]
    assert off_diagonal.abs().max() < 0.16  # 1024 values per sample: chance is 0.03 each, ~0.11 as a max of 2016
    # Neighbouring elements of one sample are not correlated either.
    assert abs(torch.corrcoef(torch.stack([flat[:, :-1].flatten(), flat[:, 1:].flatten()]))[0, 1]) < 0.02


def test_keyed_uniforms_are_uniform_and_streams_are_independent():
    u = keyed_uniform(range(20000), 2, "cpu")
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u[:, 0], bins=10, min=0, max=1)
    assert (counts - 2000).abs().max() < 200
    assert abs(torch.corrcoef(u.T)[0, 1]) < 0.03
    z = keyed_normal(range(20000), (1,), "cpu")[:, 0]
    assert abs(torch.corrcoef(torch.stack([u[:, 0], z]))[0, 1]) < 0.03


def test_a_samples_noise_depends_only_on_its_key():
    x = torch.zeros(6, 1, 8, 8)
    objective = FlowMatching(class_dropout=0.5)
    whole = objective.draw_keyed(x, [10, 11, 12, 13, 14, 15])
    halves = [objective.draw_keyed(x[:3], keys) for keys in ([10, 11, 12], [13, 14, 15])]
    for i in range(3):
        assert torch.equal(whole[i], torch.cat([h[i] for h in halves]))
    again = objective.draw_keyed(x, [10, 11, 12, 13, 14, 15])
    assert all(torch.equal(a, b) for a, b in zip(whole, again))
    assert not torch.equal(whole[1][0], whole[1][1])
    big = objective.draw_keyed(x, [2**62 + 5, 2**62 + 6, 7, 8, 9, 10])
    assert not torch.equal(big[1][0], big[1][1])


def test_keyed_uniforms_never_reach_zero_or_one():
    """Every 32-bit hash value maps strictly inside (0, 1), so logit-normal times stay finite."""
    from genfoundry.diffusion.noise import _unit
    from genfoundry.diffusion.objective import logit_normal

    extremes = torch.tensor([0, 1, 2**8, 2**9 - 1, 2**31, 2**32 - 2**9, 2**32 - 2, 2**32 - 1], dtype=torch.int64)
    u = _unit(extremes)
    assert (u > 0).all() and (u < 1).all(), u
    assert torch.isfinite(logit_normal(u)).all()
