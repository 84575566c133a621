"""Host-side collectives: on the device the backend takes, one per metrics interval, names agreed."""

import re
from pathlib import Path

import torch

from genfoundry import accel, metrics

from multiproc import run_ranks

PACKAGE = Path(__file__).resolve().parent.parent / "genfoundry"
# Files that may call torch.distributed collectives directly: the checked helpers themselves, the
# gradient hooks (they reduce DDP's buckets, which are on the model's device) and the benchmark of raw
# collectives on device tensors.
RAW_COLLECTIVES_ALLOWED = {"accel.py", "distributed/compression.py", "distributed/torus.py", "bench/comm.py"}
_COLLECTIVE = re.compile(r"\b(?:dist|torch\.distributed)\.(all_reduce|broadcast|all_gather|all_gather_into_tensor|"
                         r"all_gather_single|reduce_scatter\w*|reduce|gather|scatter|all_to_all\w*)\(")


def test_backend_devices_follow_the_backend_config():
    assert accel.backend_devices("cpu:gloo,cuda:gloo") == ["cpu", "cuda"]
    assert accel.backend_devices("cuda:nccl") == ["cuda"]
    assert accel.backend_devices("cpu:gloo, cuda:nccl") == ["cpu", "cuda"]


def test_every_host_side_collective_goes_through_the_device_checked_helpers():
    """A collective on a tensor made on the host (the bug NCCL rejects, gloo forgives) can only come
    from a direct torch.distributed call: there is none outside the helpers and the gradient hooks."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(PACKAGE).as_posix()
        if name in RAW_COLLECTIVES_ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _COLLECTIVE.search(line.split("#")[0]):
                offenders.append(f"{name}:{number}: {line.strip()}")
    assert not offenders, "use accel.all_reduce / accel.broadcast_int:\n" + "\n".join(offenders)


def test_report_keeps_tensors_on_their_device_until_collect():
    metrics.collect()
    for v in (torch.tensor(2.0), torch.tensor([1.0, 3.0])):
        metrics.report("loss", v)
    metrics.report("scale", 4)
    assert isinstance(metrics._sums["loss"], torch.Tensor)  # no .item(): nothing waited for the device
    assert metrics.collect() == {"loss": 2.0, "scale": 4.0}
    assert metrics.collect() == {}
    metrics.report("wait", 0.5, spread=True)
    assert metrics.collect() == {"wait": 0.5}  # alone, no .min/.max: they would equal the mean


def _ranks_report_different_names(rank, world_size, out):
    assert accel.rank() == rank and accel.world_size() == world_size
    assert accel.comm_device() == torch.device("cpu")  # gloo takes host tensors
    metrics.report("loss", torch.tensor(float(rank + 1)))
    metrics.report("loss", torch.tensor(float(rank + 1)))
    if rank == 1:
        metrics.report("only_rank1", 5.0)
    first = metrics.collect()
    metrics.report("loss", torch.tensor(float(10 * rank)))
    second = metrics.collect()
    for v in (1.0, 3.0) if rank == 0 else (10.0,):  # rank means 2 and 10, over 3 values
        metrics.report("wait", v, spread=True)
    if rank == 1:
        metrics.report("late", torch.tensor(7.0), spread=True)  # one rank only: its value is both extremes
    spread = metrics.collect()
    agreed = accel.broadcast_int(41 + rank, src=1)
    smallest = accel.all_reduce(torch.tensor([rank + 3]), "min").item()
    torch.save({"first": first, "second": second, "spread": spread, "agreed": agreed, "smallest": smallest},
               f"{out}/{rank}.pt")


def test_collect_over_ranks_agrees_on_names_and_averages_every_value(tmp_path):
    run_ranks(_ranks_report_different_names, 2, str(tmp_path), timeout=60)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        assert got["first"] == {"loss": 1.5, "only_rank1": 5.0}  # a name one rank lacks does not hang the rest
        assert got["second"] == {"loss": 5.0}
        assert got["spread"] == {"wait": 14 / 3, "wait.min": 2.0, "wait.max": 10.0,
                                 "late": 7.0, "late.min": 7.0, "late.max": 7.0}
        assert got["agreed"] == 42 and got["smallest"] == 3
