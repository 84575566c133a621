"""The α–β cost model: formulas by hand, the fit on synthetic timings, the chooser and the crossovers."""

import math

import pytest

from genfoundry.distributed import costmodel

ALPHA, BETA = 5e-6, 1 / 20e9  # 5 µs per step, 20 GB/s
UNIFORM = costmodel.Params(ALPHA, BETA)
NODES = costmodel.Params(alpha=10e-6, beta=1 / 25e9, intra_alpha=2e-6, intra_beta=1 / 400e9, ranks_per_node=8)
SIZES = [4**k for k in range(4, 16)]  # 256 B ... 256 MiB


@pytest.mark.timeout(30)
def test_formulas_by_hand():
    n = 1_000_000
    assert costmodel.ring_time(n, 8, ALPHA, BETA) == pytest.approx(14 * ALPHA + 1.75 * n * BETA)
    assert costmodel.tree_time(n, 8, ALPHA, BETA) == pytest.approx(6 * ALPHA + 2 * n * BETA)
    assert costmodel.tree_time(n, 6, ALPHA, BETA) == pytest.approx(6 * ALPHA + 2 * n * BETA)  # ceil(log2 6) = 3
    assert costmodel.ring_time(n, 1, ALPHA, BETA) == costmodel.tree_time(n, 1, ALPHA, BETA) == 0
    # 2 x 4 on uniform links: reduce-scatter and all-gather over 4 ranks, all-reduce of n / 4 over 2.
    row = 3 * ALPHA + 0.75 * n * BETA
    column = 2 * ALPHA + 1.0 * (n / 4) * BETA
    assert costmodel.torus_time(n, 2, 4, UNIFORM) == pytest.approx(2 * row + column)


@pytest.mark.timeout(30)
def test_torus_rows_inside_nodes_use_the_fast_links():
    n = 64 * 2**20
    # 16 ranks as 2 rows of 8: each row is a node, the column crosses the network with n / 8 bytes.
    row = 7 * 2e-6 + 7 / 8 * n / 400e9
    column = 2 * 10e-6 + 1.0 * (n / 8) / 25e9
    assert costmodel.torus_time(n, 2, 8, NODES) == pytest.approx(2 * row + column)
    # Rows of 16 span two nodes: every phase is paced by the network.
    network = costmodel.Params(10e-6, 1 / 25e9)
    assert costmodel.torus_time(n, 2, 16, NODES) == pytest.approx(costmodel.torus_time(n, 2, 16, network))
    # On one node the flat ring runs on NVLink; across nodes on the network.
    assert costmodel.predict(n, 8, NODES)["ring"] == pytest.approx(costmodel.ring_time(n, 8, 2e-6, 1 / 400e9))
    assert costmodel.predict(n, 16, NODES)["ring"] == pytest.approx(costmodel.ring_time(n, 16, 10e-6, 1 / 25e9))


@pytest.mark.timeout(30)
def test_uniform_torus_sends_the_ring_bytes_with_fewer_steps():
    n, p = 2**24, 64
    torus = costmodel.torus_time(n, 8, 8, UNIFORM)
    ring = costmodel.ring_time(n, p, ALPHA, BETA)
    # Same bandwidth term, 2 (8 - 1) + 2 (8 - 1) = 28 latency steps instead of 2 (64 - 1) = 126.
    assert ring - torus == pytest.approx((126 - 28) * ALPHA)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("algorithm", ["ring", "tree"])
def test_fit_recovers_alpha_and_beta(algorithm):
    formula = {"ring": costmodel.ring_time, "tree": costmodel.tree_time}[algorithm]
    measurements = [(n, p, formula(n, p, ALPHA, BETA)) for n in SIZES for p in (4, 8)]
    params = costmodel.fit(measurements, algorithm=algorithm)
    assert params.alpha == pytest.approx(ALPHA, rel=1e-6)
    assert params.beta == pytest.approx(BETA, rel=1e-6)


@pytest.mark.timeout(30)
def test_fit_on_one_world_size_with_noise():
    # As the benchmark has it: one world size, timings off by up to ±3 %.
    noise = [1.03, 0.97, 1.01, 0.99, 1.02, 0.98] * 2
    measurements = [(n, 8, costmodel.ring_time(n, 8, ALPHA, BETA) * e) for n, e in zip(SIZES, noise)]
    params = costmodel.fit(measurements)
    assert params.alpha == pytest.approx(ALPHA, rel=0.05)
    assert params.beta == pytest.approx(BETA, rel=0.05)


@pytest.mark.timeout(30)
def test_fit_refuses_what_cannot_determine_two_parameters():
    with pytest.raises(ValueError, match="at least two message sizes"):
        costmodel.fit([(4096, 8, 1e-4), (4096, 8, 1.1e-4)])


@pytest.mark.timeout(30)
def test_chooser_tree_for_tiny_messages_on_many_ranks_and_bandwidth_for_large():
    assert costmodel.choose(1024, 4096, UNIFORM)[0] == "tree"
    assert costmodel.choose(1024, 4096, NODES)[0] == "tree"
    # Large messages: without tori the ring wins; with nodes, the torus whose rows are nodes.
    assert costmodel.choose(2**30, 16, UNIFORM, shapes=[])[0] == "ring"
    best, predictions = costmodel.choose(2**30, 64, NODES)
    assert best == "torus 8x8"
    assert predictions[best] == min(predictions.values())
    assert set(predictions) == {"ring", "tree"} | {costmodel.torus_name(r, c) for r, c in costmodel.torus_shapes(64)}


@pytest.mark.timeout(30)
def test_torus_shapes_and_ties():
    assert costmodel.torus_shapes(12) == [(2, 6), (3, 4), (4, 3), (6, 2)]
    assert costmodel.torus_shapes(7) == []
    # 2x4 and 4x2 cost the same on uniform links: the first listed wins, whatever the rounding.
    assert costmodel.fastest({"torus 2x4": 1.0, "torus 4x2": 1.0 - 1e-15}) == "torus 2x4"


@pytest.mark.timeout(30)
def test_crossover_where_ring_and_tree_predictions_cross():
    p = 64
    found = costmodel.crossovers(UNIFORM, p, SIZES + [2**32, 2**36], shapes=[])
    assert [(a, b) for _, a, b in found] == [("tree", "ring")]
    # ring - tree = 2 (p - 1 - log2 p) α - 2 n β / p, zero at n = p α (p - 1 - log2 p) / β
    expected = p * ALPHA * (p - 1 - math.log2(p)) / BETA
    assert found[0][0] == pytest.approx(expected, rel=1e-6)  # ties within 1e-9 go to the first listed
    ring = costmodel.ring_time(found[0][0], p, ALPHA, BETA)
    assert ring == pytest.approx(costmodel.tree_time(found[0][0], p, ALPHA, BETA), rel=1e-8)


@pytest.mark.timeout(30)
def test_simulate_prints_a_row_per_world_and_size_and_the_crossovers():
    lines = []
    result = costmodel.simulate(NODES, [2**10, 2**20, 2**30], worlds=(8, 64, 4096), print_fn=lines.append)
    assert len(result["rows"]) == 9
    assert {r["world"] for r in result["rows"]} == {8, 64, 4096}
    text = "\n".join(lines)
    assert "crossovers" in text and "4096" in text
    # On 64 ranks the choice moves from the tree to the node-shaped torus between 1 KiB and 1 GiB.
    assert [(a, b) for _, a, b in result["crossovers"]["64"]] == [("tree", "torus 8x8")]
