"""User mistakes are GenfoundryErrors the CLI prints as one line; every other exception keeps its traceback."""

import ast
from pathlib import Path

import pytest

import genfoundry
from genfoundry import cli, errors


@pytest.mark.parametrize("args, message", [
    (["sample", "/nonexistent/run"], "is not a run directory"),
    (["train", "--dry-run", "--train.lr=abc"], "train.lr must be a number, got 'abc'"),
    (["train", "--dry-run", "--config", "no-such-recipe"], "no recipe 'no-such-recipe'"),
    (["train", "--model.preset=DiT-X/9", "--train.steps=1", "--train.global_batch_size=8"],
     "model.preset 'DiT-X/9' is not one of"),
], ids=["missing-run-dir", "bad-override", "unknown-recipe", "unknown-preset"])
def test_user_mistake_is_one_line_and_exit_code_2(cli, tmp_path, args, message):
    r = cli(*args, cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(f"genfoundry {args[0]}: error: ") and message in lines[0]


@pytest.mark.parametrize("error", [ValueError("bug"), FileNotFoundError("bug"), TypeError("bug")])
def test_programming_error_keeps_its_traceback(monkeypatch, error):
    from genfoundry import api

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(api, "sample", broken)
    with pytest.raises(type(error), match="bug"):
        cli.main(["sample", "runs/x"])


def test_genfoundry_error_raised_anywhere_becomes_one_line(monkeypatch, capsys):
    from genfoundry import api

    def broken(*args, **kwargs):
        raise api.RunError("'runs/x' has no final model")

    monkeypatch.setattr(api, "sample", broken)
    assert cli.main(["sample", "runs/x"]) == 2
    assert capsys.readouterr().err == "genfoundry sample: error: 'runs/x' has no final model\n"


def test_every_error_class_is_a_genfoundry_error():
    from genfoundry import api, checkpoint, config, sources
    from genfoundry.data.decode import DecodeError
    from genfoundry.features import FeatureExtractorError
    from genfoundry.shards.index import ShardError

    assert config.ConfigError is errors.ConfigError
    for cls in (errors.ConfigError, sources.SourceError, api.RunError, checkpoint.CheckpointError, DecodeError,
                FeatureExtractorError, ShardError):
        assert issubclass(cls, errors.GenfoundryError) and issubclass(cls, ValueError), cls


def test_no_value_error_subclass_bypasses_genfoundry_error():
    """A ValueError subclass defined in the package is a user error, so it derives from GenfoundryError."""
    direct = []
    for path in Path(genfoundry.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name != "GenfoundryError":
                if any(getattr(b, "id", getattr(b, "attr", None)) == "ValueError" for b in node.bases):
                    direct.append(f"{path.name}: {node.name}")
    assert not direct, direct


@pytest.mark.parametrize("args,message", [
    (["train", "--dry-run", "--model.preset=DiT-Z/9"], "model.preset 'DiT-Z/9' is not one of"),
    (["train", "--dry-run", "--diffusion.time_sampling=gaussian"], "diffusion.time_sampling 'gaussian'"),
    (["eval", "RUN", "--num-samples", "-5"], "--num-samples must be at least 2"),
    (["eval", "RUN", "--num-samples", "0"], "--num-samples must be at least 2"),
    (["sample", "RUN", "--steps", "0"], "--steps must be at least 1"),
    (["sample", "RUN", "--num-images", "0"], "--num-images must be at least 1"),
])
def test_values_that_used_to_mean_the_default_or_crash_are_one_line(cli, tmp_path, args, message):
    r = cli(*[str(tmp_path / "run") if a == "RUN" else a for a in args])
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
