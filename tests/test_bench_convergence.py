"""genfoundry bench convergence end to end at a toy scale: the protocol, both curves, the table, the plot."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

from genfoundry.bench import convergence  # noqa: E402
from genfoundry.sources import FASHION_MNIST_DIR  # noqa: E402

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                                reason="needs Debian's dataset-fashion-mnist")


@pytest.mark.timeout(600)
def test_both_curves_are_scored_at_their_marks_and_summarized(tmp_path):
    torch.set_num_threads(2)
    protocol = convergence.Protocol(torch.device("cpu"), samples=10, references=20, batch_size=20)
    result = {"device": "cpu", "protocol": protocol.describe(), "floor": protocol.floor(), "curves": [{}, {}]}
    protocol.train.images = protocol.train.images[:400]  # the baseline trains on these
    assert 0 < result["floor"]["test_images"] < 1e4 and 0 < result["floor"]["other_training_images"] < 1e4 and result["protocol"]["references"] == 20
    saves = []
    ours = convergence.genfoundry_curve(
        protocol, "demo", {"run.device": "cpu", "train.global_batch_size": 8, "train.log_every": 5,
                           "train.val_batch_size": 16, "sample.steps": 2, "sample.batch_size": 10,
                           "run.threads": 2}, True, [1.5, 3.0], str(tmp_path), curve=result["curves"][0],
        saved=lambda: saves.append(1))
    base = convergence.ddpm_curve(protocol, [1.0, 2.0], "cpu", batch_size=8, inference_steps=2,
                                  curve=result["curves"][1], tiny=True)
    assert ours is result["curves"][0] and base is result["curves"][1]
    assert [p["mark_s"] for p in ours["points"]] == [1.5, 3.0] and len(saves) == 2
    assert ours["points"][-1]["train_s"] > ours["points"][0]["train_s"] >= 1.5 and ours["total_steps"] == ours["points"][-1]["step"]
    assert [p["mark_s"] for p in base["points"]] == [1.0, 2.0] and base["points"][1]["train_s"] >= 2.0
    assert all(p["fid"] > 0 for c in result["curves"] for p in c["points"])
    table = convergence.summarize(result, targets=(1e9, 1e-3))
    assert table["genfoundry-conditional"] == {"1000000000.0": ours["points"][0]["train_s"], "0.001": None}
    assert "time_to_baseline_final_fid" in ours
    png = convergence.plot(json.loads(json.dumps(result)), tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
