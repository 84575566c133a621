"""The progress bar: rate and ETA on a terminal, nothing on a pipe, a file or another rank."""

import fcntl
import os
import pty
import re
import select
import struct
import sys
import termios

import pytest
import torch

from genfoundry.sampling import generate
from genfoundry.models import build_model
from genfoundry.progress import bar

RATE_AND_ETA = re.compile(r"10/10 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+img/s\]")


@pytest.fixture
def terminal(monkeypatch):
    """A pseudo-terminal 100 columns wide: the file a bar writes to, and a function reading what it got."""
    monkeypatch.delenv("RANK", raising=False)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    tty = os.fdopen(slave, "w", encoding="utf-8")

    def read() -> str:
        tty.flush()
        out = b""
        while select.select([master], [], [], 0)[0]:
            out += os.read(master, 65536)
        return out.decode("utf-8", "replace")

    yield tty, read
    tty.close()
    os.close(master)


def count_to_ten(file, **options) -> None:
    with bar(10, "work", file=file, **options) as shown:
        for _ in range(10):
            shown.update()


def test_a_terminal_shows_the_rate_and_the_eta(terminal):
    tty, read = terminal
    count_to_ten(tty)
    text = read()
    assert text.startswith("\rwork:") and "100%" in text
    assert RATE_AND_ETA.search(text), text


def test_nothing_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with open(tmp_path / "log.txt", "w") as log:
        count_to_ten(log)
    assert (tmp_path / "log.txt").read_text() == ""
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as pipe:
        count_to_ten(pipe)
    with os.fdopen(read_end) as pipe:
        assert pipe.read() == ""


def test_nothing_on_another_rank_nor_when_disabled(terminal, monkeypatch):
    tty, read = terminal
    monkeypatch.setenv("RANK", "1")
    count_to_ten(tty)
    assert read() == ""
    monkeypatch.setenv("RANK", "0")
    count_to_ten(tty, enabled=False)
    assert read() == ""
    count_to_ten(tty)
    assert RATE_AND_ETA.search(read())


def test_sampling_bar_is_on_by_default_and_off_with_progress_false(terminal, monkeypatch):
    tty, read = terminal
    monkeypatch.setattr(sys, "stderr", tty)  # where a bar goes by default: now a terminal
    torch.manual_seed(0)
    model = build_model("DiT-T/4", 8, 1, 2).eval()
    labels = torch.tensor([0, 1])
    quiet = generate(model, labels, range(2), steps=1, sampler="euler", batch_size=1, progress=False)
    assert read() == ""
    shown = generate(model, labels, range(2), steps=1, sampler="euler", batch_size=1)
    assert "sample: 100%" in read() and torch.equal(quiet, shown)
