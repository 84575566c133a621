"""The one atomic-write helper: used for every durable file, and a failed write keeps the last good one."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from genfoundry.checkpoint.storage import atomic_writer, write_atomic

from conftest import ROOT


def test_a_failed_write_leaves_the_last_good_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.toml"
    write_atomic(path, b"good")
    with pytest.raises(RuntimeError):
        with atomic_writer(path) as f:
            f.write(b"half of a new")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"good" and [p.name for p in tmp_path.iterdir()] == ["config.toml"]


def test_every_durable_file_goes_through_the_one_helper():
    """No module but checkpoint/storage.py renames files into place or writes one with write_text."""
    offenders = []
    for path in (ROOT / "genfoundry").rglob("*.py"):
        if path.name == "storage.py" and path.parent.name == "checkpoint":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"os\.replace\(|os\.rename\(|\.write_text\(|\.write_bytes\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_helper_does_not_import_torch():
    """Shard-packing workers import it; torch would cost each of them seconds and hundreds of MB."""
    code = "import sys, genfoundry.shards.pack, genfoundry.checkpoint.storage; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(ROOT)).returncode == 0
