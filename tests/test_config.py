import pytest

from genfoundry import config
from genfoundry.config import ConfigError


def test_defaults_and_recipe_load():
    cfg = config.load("demo")
    assert cfg.run.name == "demo" and cfg.model.preset == "DiT-T/4"


def test_override_coerces_types():
    cfg = config.load("demo", {"train.lr": "3e-4", "train.steps": "12", "data.hflip": "true", "run.name": "x"})
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 12 and isinstance(cfg.train.steps, int)
    assert cfg.data.hflip is True and cfg.run.name == "x"


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        config.load(None, {"train.lrr": "1"})


@pytest.mark.parametrize("key,value,message", [
    ("train.steps", "ten", "must be an integer"),
    ("train.steps", "1.5", "must be an integer"),
    ("train.lr", "fast", "must be a number"),
    ("data.hflip", "maybe", "true or false"),
    ("train.precision", "fp8", "auto, fp32, bf16, fp16"),
    ("sample.sampler", "rk4", "euler, heun, dpm\\+\\+2m"),
    ("sample.schedule", "cosine", "uniform, shift, karras, logsnr"),
    ("sample.compile", "max", "auto, none, compile, graphs"),
    ("train.lr", "-1", "must be positive"),
    ("model.class_dropout", "1.0", r"\[0, 1\)"),
])
def test_bad_values_raise_one_clear_error(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config.load(None, {key: value})


def test_dumps_roundtrips(tmp_path):
    cfg = config.load("demo", {"train.lr": "5e-4", "run.name": 'quote"d'})
    path = tmp_path / "c.toml"
    path.write_text(config.dumps(cfg))
    assert config.load(str(path)) == cfg
    assert "format_version = 1" in path.read_text()


def test_parse_overrides_forms():
    assert config.parse_overrides(["--train.lr=1e-3", "--run.name", "a"]) == {"train.lr": "1e-3", "run.name": "a"}
    with pytest.raises(ConfigError, match="no value"):
        config.parse_overrides(["--train.lr"])
    with pytest.raises(ConfigError, match="unexpected argument"):
        config.parse_overrides(["lr=3"])


def test_unknown_recipe_lists_available():
    with pytest.raises(ConfigError, match="demo"):
        config.load("no-such-recipe")


def test_hash_ignores_logging_but_not_training():
    a = config.load("demo")
    assert config.config_hash(a) == config.config_hash(config.load("demo", {"train.log_every": 7, "train.steps": 9}))
    assert config.config_hash(a) == config.config_hash(config.load("demo", {"data.workers": 5}))
    assert config.identity_diff(a, config.load("demo", {"data.fast_jpeg": True})) == ["data.fast_jpeg"]
    b = config.load("demo", {"train.lr": 1e-5})
    assert config.config_hash(a) != config.config_hash(b)
    assert config.identity_diff(a, b) == ["train.lr"]


def test_cli_bad_override_is_one_line(cli):
    r = cli("train", "--train.lr=abc")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "train.lr must be a number" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_dry_run_prints_resolved_config(cli, tmp_path):
    r = cli("train", "--config", "demo", "--train.steps=3", "--dry-run", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps = 3" in r.stdout and 'preset = "DiT-T/4"' in r.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key,value,message", [
    ("train.warmup_steps", "-10", "train.warmup_steps must be 0 or more"),
    ("train.ema_halflife_kimg", "-1", "train.ema_halflife_kimg must be 0 or more"),
    ("train.val_every", "0", "train.val_every must be at least 1"),
    ("train.beta2", "1.5", r"train.beta2 must be in \[0, 1\)"),
    ("run.threads", "-1", "run.threads must be 0"),
    ("eval.num_samples", "0", "eval.num_samples must be at least 2"),
    ("sample.per_class", "0", "sample.per_class must be at least 1"),
    ("parallel.powersgd_rank", "0", "parallel.powersgd_rank must be at least 1"),
])
def test_values_that_would_train_wrongly_or_crash_later_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config.load("demo", {key: value})


def test_a_missing_recipe_file_is_named_as_missing(tmp_path):
    with pytest.raises(ConfigError, match="recipe file '.*missing.toml' does not exist"):
        config.load(str(tmp_path / "missing.toml"))


def test_the_same_folder_spelled_differently_is_the_same_data(tmp_path, monkeypatch):
    (tmp_path / "photos").mkdir()
    monkeypatch.chdir(tmp_path)
    spellings = ["photos", "photos/", str(tmp_path / "photos"), "./photos//"]
    identities = {config.config_hash(config.load("demo", {"data.source": s})) for s in spellings}
    assert len(identities) == 1
    assert not config.identity_diff(config.load("demo", {"data.source": "photos"}),
                                    config.load("demo", {"data.source": str(tmp_path / "photos") + "/"}))
    assert config.identity_diff(config.load("demo", {"data.source": "photos"}),
                                config.load("demo", {"data.source": "mnist"})) == ["data.source"]
    assert config.source_identity("s3://bucket/shards/") == "s3://bucket/shards"
