"""Hyper-parameter search over any config keys, on Optuna.

Each trial is a short run of the base recipe with fixed overrides and the values Optuna's sampler
(TPE) picks for the searched keys, named `<study>/trial-NNNN` under run.root. It is scored by its final
validation loss (or by FID) and may be stopped early at a validation where it falls behind the others
(pruned). The study lives in a database, SQLite at `<run.root>/<study>/study.db` unless `storage` names
another, so that running the same search again resumes it and several processes or machines pointed
at one storage share it. Trials heartbeat: the trial of a process that died is taken over by the next
process that looks, and resumes from its run directory's newest checkpoint.

After every trial `<run.root>/<study>/` holds trials.json (every trial), best.toml (the best trial's
resolved config as a recipe) and report.html (the trials table and the completed runs' curves).

Search space syntax, one `KEY=SPEC` per searched key (`--search`) or a `[search]` table in a TOML file:

    log:LO:HI          log-uniform in [LO, HI] (LO > 0)
    LO:HI[:STEP]       uniform in [LO, HI]; integers where the key is an integer
    float:LO:HI[:STEP] the same, said outright
    int:LO:HI[:STEP]   integers in [LO, HI]
    choice:A,B,...     one of the values (text, numbers, true/false)
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import time
import tomllib
import warnings
from pathlib import Path

from genfoundry import config as config_lib
from genfoundry.checkpoint.storage import write_atomic
from genfoundry.config import Config, ConfigError
from genfoundry.errors import GenfoundryError, writable_directory

FORMAT_VERSION = 1
METRICS = ("val_loss", "val_loss_ema", "fid")
PRUNERS = ("median", "hyperband", "none")
TRIALS_FILE, BEST_FILE, DATABASE = "trials.json", "best.toml", "study.db"
FAILURES_IN_A_ROW = 3   # trials of one process that fail in a row (a user error each) before it stops
MAX_RETRIES = 3         # times one trial is taken over after its process died, or resumed after an interrupt
STORAGE_ATTEMPTS = 5    # tries to open a storage: two processes that create one database race to make its tables
RECORD_WAIT_S = 30.0    # how long a process that joins a new study waits for its creator to record its settings
# Keys that may differ between the commands that share a study (another machine's paths or threads).
LOCAL_KEYS = ("run.name", "run.root", "run.device", "run.threads", "data.workers", "train.report_every",
              "train.tensorboard")
SPEC_HELP = "log:LO:HI, LO:HI, int:LO:HI or choice:A,B,..."


class TuneError(GenfoundryError):
    """A study that cannot start or go on: its storage, its earlier settings, or its run directories."""


# ---- the search space ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Param:
    """One searched key: integers or floats in [low, high] (log-uniform, or on a grid of `step`), or one
    of `choices`."""

    key: str
    kind: str                  # "int" | "float" | "choice"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def spec(self) -> str:
        """The SPEC that `--search KEY=SPEC` writes for this parameter."""
        if self.kind == "choice":
            return "choice:" + ",".join(_text(c) for c in self.choices)
        head = "log" if self.log else self.kind
        return f"{head}:{self.low}:{self.high}" + (f":{self.step}" if self.step is not None else "")

    def to_dict(self) -> dict:
        if self.kind == "choice":
            return {"kind": "choice", "choices": list(self.choices)}
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log, "step": self.step}

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def holds(self, value) -> bool:
        """Whether `value` (coerced to the key's type) is one this parameter can take."""
        if self.kind == "choice":
            return value in self.choices
        if not self.low <= value <= self.high:
            return False
        return self.step is None or math.isclose((value - self.low) / self.step, round((value - self.low) / self.step),
                                                 abs_tol=1e-9)


def _text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def key_types() -> dict[str, str]:
    """{'section.key': 'int' | 'float' | 'str' | 'bool'} of every config key."""
    out = {}
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.default_factory):
            out[f"{section.name}.{f.name}"] = f.type if isinstance(f.type, str) else f.type.__name__
    return out


def _number(key: str, text, integer: bool, what: str):
    """A bound or step of `key`'s range from the command line or a TOML file."""
    if isinstance(text, bool):
        raise ConfigError(f"search {key}: the {what} must be a number, got '{_text(text)}'")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"search {key}: the {what} must be a number, got '{text}'") from None
    if not math.isfinite(value):
        raise ConfigError(f"search {key}: the {what} must be finite, got '{text}'")
    if integer:
        if not value.is_integer():
            raise ConfigError(f"search {key}: the {what} of an integer range must be an integer, got '{text}'")
        return int(value)
    return value


def _check_key(base: Config, key: str, types: dict[str, str]) -> str:
    """The key's type, or the config's own error for a key that does not exist (with its closest match)."""
    if key not in types:
        try:
            config_lib.apply_overrides(base, {key: ""})
        except ConfigError as e:
            raise ConfigError(f"search: {e}") from None
        raise ConfigError(f"search: unknown config key '{key}'")
    if key in ("run.name", "run.root"):
        raise ConfigError(f"search: {key} cannot be searched (each trial runs as <run.root>/<study>/trial-NNNN)")
    return types[key]


def parse_param(base: Config, key: str, spec, types: dict[str, str] | None = None) -> Param:
    """One searched key from a SPEC string (`log:1e-4:3e-3`), a list (the choices) or a table
    (`{low = 0.5, high = 20, log = false, step = 0.5}`, or `{choices = [...]}`); every value it can take
    is checked against `base` before any trial runs (the range's ends, every choice)."""
    types = types or key_types()
    kind = _check_key(base, key, types)
    shown = spec if isinstance(spec, str) else json.dumps(spec, default=str)
    head, low, high, step, log, choices = None, None, None, None, False, None
    if isinstance(spec, list):
        choices = spec
    elif isinstance(spec, dict):
        unknown = sorted(set(spec) - {"low", "high", "log", "step", "choices"})
        if unknown:
            raise ConfigError(f"search {key}: unknown field(s) {', '.join(unknown)} in its table; a range is "
                              f"{{low = LO, high = HI}} (optionally log = true, step = S), a choice "
                              f"{{choices = [A, B]}}")
        if "choices" in spec:
            if set(spec) != {"choices"} or not isinstance(spec["choices"], list):
                raise ConfigError(f"search {key}: a choice table holds only choices = [A, B, ...]")
            choices = spec["choices"]
        elif "low" not in spec or "high" not in spec:
            raise ConfigError(f"search {key}: a range table needs both low and high")
        else:
            low, high, step = spec["low"], spec["high"], spec.get("step")
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise ConfigError(f"search {key}: log must be true or false, got '{log}'")
    elif isinstance(spec, str):
        head, _, rest = spec.partition(":")
        if head == "choice":
            choices = rest.split(",") if rest else []
        else:
            parts = spec.split(":")
            if parts[0] in ("log", "int", "float"):
                head, parts = parts[0], parts[1:]
            else:
                head = None
            if len(parts) not in (2, 3):
                raise ConfigError(f"search {key}='{spec}': expected {SPEC_HELP} (a fixed value is an override, "
                                  f"--{key}=VALUE)")
            low, high = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else None
            log = head == "log"
    else:
        raise ConfigError(f"search {key}: expected a SPEC string ({SPEC_HELP}), a list of choices or a "
                          f"{{low, high}} table, got {shown}")

    if choices is not None:
        if not choices or any(c == "" for c in choices):
            raise ConfigError(f"search {key}='{shown}': a choice needs values, e.g. choice:A,B")
        values = []
        for choice in choices:
            if isinstance(choice, (list, dict)):
                raise ConfigError(f"search {key}: a choice is a text, a number or true/false, got {choice}")
            values.append(_accepted(base, key, choice, shown))
        if len(set(map(repr, values))) < len(values):
            raise ConfigError(f"search {key}='{shown}': a value is listed twice")
        return Param(key, "choice", choices=tuple(values))

    if kind in ("str", "bool"):
        example = "choice:true,false" if kind == "bool" else "choice:A,B"
        raise ConfigError(f"search {key}: a {'true/false' if kind == 'bool' else 'text'} key takes a choice "
                          f"({example}), not a range")
    integer = kind == "int" or head == "int"
    low = _number(key, low, integer, "low end")
    high = _number(key, high, integer, "high end")
    if step is not None:
        step = _number(key, step, integer, "step")
        if step <= 0:
            raise ConfigError(f"search {key}: the step must be positive, got {step}")
        if log:
            raise ConfigError(f"search {key}: a log range takes no step")
    if not low < high:
        raise ConfigError(f"search {key}='{shown}': the low end must be below the high end")
    if log and low <= 0:
        raise ConfigError(f"search {key}='{shown}': a log range needs a low end above 0")
    for end in (low, high):
        _accepted(base, key, end, shown)
    return Param(key, "int" if integer else "float", low, high, log, step)


def _accepted(base: Config, key: str, value, shown: str):
    """`value` coerced to `key`'s type, once the config (and the registries of names) accept it."""
    from genfoundry.api import check_names

    section, _, name = key.partition(".")
    try:
        cfg = config_lib.apply_overrides(base, {key: value})
        check_names(cfg)
    except ConfigError as e:
        raise ConfigError(f"search {key}='{shown}': {_text(value)} is not accepted: {e}") from None
    return getattr(getattr(cfg, section), name)


def parse_search(items) -> dict[str, object]:
    """`['train.lr=log:1e-4:3e-3', ...]` (as --search gives them) or a dict -> {key: spec}."""
    if items is None:
        return {}
    if isinstance(items, dict):
        return dict(items)
    out = {}
    for item in [items] if isinstance(items, str) else items:
        key, sep, spec = item.partition("=")
        if not sep or not key or not spec:
            raise ConfigError(f"--search '{item}': expected KEY=SPEC, e.g. train.lr=log:1e-4:3e-3 ({SPEC_HELP})")
        if key in out:
            raise ConfigError(f"--search {key} is given twice")
        out[key.strip()] = spec.strip()
    return out


def read_space(path: str | Path) -> tuple[dict[str, object], list[dict]]:
    """A space file's `[search]` table (flattened to {'section.key': spec}) and its `[[enqueue]]` trials."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the search space '{path}': {getattr(e, 'strerror', None) or e}") from None
    unknown = sorted(set(data) - {"search", "enqueue"})
    if unknown:
        raise ConfigError(f"{path}: a search space holds a [search] table and optionally [[enqueue]] tables, not "
                          f"{', '.join(unknown)} (fixed keys go in the recipe or on the command line)")
    search = data.get("search")
    if not isinstance(search, dict):
        raise ConfigError(f"{path}: no [search] table")
    enqueue = data.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise ConfigError(f"{path}: enqueue must be [[enqueue]] tables of keys and values")
    return _flatten(search), [_flatten(e) for e in enqueue]


def _flatten(table: dict) -> dict:
    """{'train': {'lr': X}} and {'train.lr': X} alike -> {'train.lr': X}; a value that is itself a range
    table ({low, high}) stays whole."""
    sections = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for key, value in table.items():
        if isinstance(value, dict) and key in sections:
            for inner, spec in value.items():
                out[f"{key}.{inner}"] = spec
        else:
            out[key] = value
    return out


def parse_enqueue(items) -> list[dict]:
    """`['train.lr=2e-3,train.warmup_steps=100', ...]` (one trial each) or a list of dicts."""
    out = []
    for item in items or []:
        if isinstance(item, dict):
            out.append(dict(item))
            continue
        trial = {}
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--enqueue '{item}': expected KEY=VALUE[,KEY=VALUE...]")
            trial[key.strip()] = value.strip()
        out.append(trial)
    return out


def build_space(base: Config, search=None, space: str | Path | None = None,
                overrides: dict | None = None) -> tuple[list[Param], list[dict]]:
    """The searched parameters (from `space`'s file, then `search`, which wins for a key in both) and the
    enqueued trials of the file, every key and value checked."""
    specs, enqueued = read_space(space) if space else ({}, [])
    specs.update(parse_search(search))
    if not specs:
        raise ConfigError(f"nothing to search: give --search KEY=SPEC ({SPEC_HELP}) or --space FILE.toml")
    types = key_types()
    fixed = set(overrides or {})
    params = []
    for key, spec in specs.items():
        if key in fixed:
            raise ConfigError(f"{key} is both fixed (--{key}=...) and searched; drop one of them")
        params.append(parse_param(base, key, spec, types))
    return params, enqueued


def check_enqueued(params: list[Param], enqueued: list[dict], base: Config) -> list[dict]:
    """Enqueued trials with their values coerced, each key searched and each value in its range."""
    by_key = {p.key: p for p in params}
    out = []
    for trial in enqueued:
        values = {}
        for key, value in trial.items():
            if key not in by_key:
                raise ConfigError(f"enqueue: {key} is not a searched key (searched: {', '.join(by_key)})")
            coerced = _accepted(base, key, value, _text(value))
            if not by_key[key].holds(coerced):
                raise ConfigError(f"enqueue: {key}={_text(value)} is outside its search space "
                                  f"{by_key[key].spec()}")
            values[key] = coerced
        out.append(values)
    return out


# ---- the study -----------------------------------------------------------------------------------

def _optuna():
    try:
        import optuna
    except ImportError:
        raise TuneError("optuna is not installed: pip install 'optuna>=4.9'") from None
    return optuna


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / DATABASE).resolve()}"


def shown_url(url: str) -> str:
    """A storage URL without its password."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy parses; opening it says why
        return url


def open_storage(url: str, heartbeat_s: int):
    """Optuna's RDB storage at `url` with heartbeats: a RUNNING trial whose heartbeat is older than twice
    `heartbeat_s` is failed by the next process that looks, and retried as a new trial with the same
    values, intermediate values and user attributes (its run directory among them)."""
    optuna = _optuna()
    import sqlalchemy.exc

    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)
    for attempt in range(STORAGE_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_s,
                                                 grace_period=2 * heartbeat_s, heartbeat_stale_trial_callback=retry)
            return storage, retry
        except sqlalchemy.exc.DBAPIError as e:
            # Two processes that open a new database at once both create its tables; the one that
            # loses finds them made on its next try.
            if attempt + 1 == STORAGE_ATTEMPTS:
                raise TuneError(f"cannot open the study storage '{shown_url(url)}': "
                                f"{str(e).splitlines()[0]}") from None
            time.sleep(0.2 * (attempt + 1))
        except (ValueError, ImportError, sqlalchemy.exc.SQLAlchemyError) as e:
            raise TuneError(f"cannot open the study storage '{shown_url(url)}': {str(e).splitlines()[0]}") from None


def make_pruner(name: str, base: Config, params: list[Param], startup_trials: int, warmup_steps: int):
    """Median: a trial is stopped at a validation where its score is worse than the median of the
    finished trials' scores at that step (once `startup_trials` have finished). Hyperband: successive
    halving from the first validation to train.steps."""
    optuna = _optuna()
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_steps)
    searched = {p.key for p in params}
    first = min(max(base.train.val_every, warmup_steps, 1), base.train.steps)
    max_resource = "auto" if "train.steps" in searched or "train.val_every" in searched else base.train.steps
    return optuna.pruners.HyperbandPruner(min_resource=first, max_resource=max_resource)


def _base_identity(base: Config) -> dict:
    flat = {f"{s}.{k}": v for s, values in config_lib.to_dict(base).items() for k, v in values.items()}
    return {k: v for k, v in flat.items() if k not in LOCAL_KEYS}


def open_study(db, name: str, metric: str, params: list[Param], base: Config, sampler=None, pruner=None):
    """Create the study `name` in the storage `db`, or join it. The process that creates it records its
    metric, search space and base config; a process that joins (later, or racing the creator) must give
    the same, or its trials would not compare."""
    optuna = _optuna()
    mine = json.loads(json.dumps({"metric": metric, "space": {p.key: p.to_dict() for p in params},
                                  "base": _base_identity(base)}))  # as the storage gives them back
    try:
        study = optuna.create_study(study_name=name, storage=db, direction="minimize", sampler=sampler,
                                    pruner=pruner)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=db, sampler=sampler, pruner=pruner)
        theirs = _recorded_settings(study)
        deadline = time.monotonic() + RECORD_WAIT_S
        while theirs is None and time.monotonic() < deadline:  # its creator is about to write them
            time.sleep(0.05)
            theirs = _recorded_settings(study)
        if theirs is not None:
            _check_same_settings(name, theirs, mine)
            return study
        # Still none: its creator died before it recorded them, and this process records its own.
    # One attribute, written in one go: a joining process never reads half a record.
    study.set_user_attr("genfoundry", {"format_version": FORMAT_VERSION, **mine})
    return study


def _check_same_settings(name: str, attrs: dict, mine: dict) -> None:
    if attrs.get("metric") != mine["metric"]:
        raise TuneError(f"study '{name}' scores trials by --metric {attrs.get('metric')}, not {mine['metric']}; use "
                        f"the same metric, or name another --study")
    if attrs.get("space") != mine["space"]:
        theirs = attrs.get("space", {})
        before = " ".join(f"--search {k}={_spec_of(v)}" for k, v in theirs.items())
        raise TuneError(f"study '{name}' searches another space ({before}); search the same keys and ranges, or "
                        f"name another --study")
    theirs = attrs.get("base", {})
    changed = sorted(k for k in set(theirs) | set(mine["base"]) if theirs.get(k) != mine["base"].get(k))
    if changed:
        shown = " ".join(f"--{k}={_text(theirs[k])}" for k in changed[:6] if k in theirs)
        raise TuneError(f"study '{name}' was started with other settings of {', '.join(changed[:6])}; continue "
                        f"it with {shown}, or name another --study")


def _recorded_settings(study) -> dict | None:
    attrs = study.user_attrs
    if "genfoundry" in attrs:
        return attrs["genfoundry"]
    if "genfoundry_format" in attrs:  # the layout of one attribute per part, as the first releases wrote it
        return {k: attrs.get(k) for k in ("metric", "space", "base")}
    return None


def _spec_of(d: dict) -> str:
    if d.get("kind") == "choice":
        return "choice:" + ",".join(_text(c) for c in d["choices"])
    return f"{'log' if d.get('log') else d.get('kind')}:{d.get('low')}:{d.get('high')}" + (
        f":{d['step']}" if d.get("step") is not None else "")


class _Surplus(Exception):
    """A trial asked for after the last free slot went to another process (two asked at once)."""


class _Preempted(Exception):
    """SIGTERM reached the trial's training, which saved its state and stopped."""


def tune(study: str = "tune", trials: int = 20, search=None, space: str | Path | None = None,
         config: str = "demo", overrides: dict | None = None, metric: str = "val_loss", pruner: str = "median",
         storage: str | None = None, fid_samples: int | None = None, heartbeat_s: int = 30,
         enqueue=None, sampler_seed: int | None = None, prune_startup_trials: int = 5,
         prune_warmup_steps: int = 0, dry_run: bool = False, print_fn=print) -> dict:
    """Runs (or resumes) the study `study` until `trials` of its trials have completed or been pruned,
    counting those of every process that shares its storage; returns the summary trials.json holds.

    `search` is {key: SPEC} or ['key=SPEC', ...] (SPEC: log:LO:HI, LO:HI, int:LO:HI, choice:A,B,...);
    `space` a TOML file with a [search] table (and optional [[enqueue]] trials). `config` is the base
    recipe and `overrides` ({'train.steps': 300}) fix keys for every trial. `metric`: 'val_loss' (the
    lower of the final validation losses of the raw and EMA weights), 'val_loss_ema', or 'fid' (FID of
    `fid_samples` samples of the finished trial). `pruner`: 'median', 'hyperband' or 'none', fed at every
    validation. `enqueue`: trials to run first ({key: value} or 'key=value,key=value'). `dry_run` checks
    everything, prints the base config and the space, and runs nothing."""
    from genfoundry.api import check_names

    overrides = dict(overrides or {})
    _check_arguments(study, trials, metric, pruner, fid_samples, heartbeat_s, prune_startup_trials,
                     prune_warmup_steps, overrides)
    base = config_lib.load(config, overrides)
    check_names(base)
    params, enqueued = build_space(base, search, space, overrides)
    enqueued = check_enqueued(params, enqueued + parse_enqueue(enqueue), base)
    if dry_run:
        print_fn(config_lib.dumps(base), end="")
        print_fn("\n[search]")
        for p in params:
            print_fn(f"{json.dumps(p.key)} = {json.dumps(p.spec())}")
        return {"study": study, "search": {p.key: p.spec() for p in params}, "dry_run": True}
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise TuneError("genfoundry tune trains each trial in its own process; run it without torchrun (start one "
                        "tune per machine on a shared --storage to search in parallel)")
    optuna = _optuna()
    study_dir = writable_directory(Path(base.run.root) / study, TuneError)
    url = storage or default_storage(study_dir)
    with _quiet_optuna(optuna):
        db, retry = open_storage(url, heartbeat_s)
        sampler = optuna.samplers.TPESampler(seed=sampler_seed)
        try:
            st = open_study(db, study, metric, params, base, sampler=sampler,
                            pruner=make_pruner(pruner, base, params, prune_startup_trials, prune_warmup_steps))
        except GenfoundryError:
            raise
        except Exception as e:  # a database that is not an Optuna one, a schema of another Optuna version
            raise TuneError(f"cannot open study '{study}' in '{shown_url(url)}': {str(e).splitlines()[0]}") from None
        for values in enqueued:
            st.enqueue_trial(values, skip_if_exists=True)
        return _Search(st, study, study_dir, url, trials, params, config, overrides, Path(base.run.root), metric,
                       fid_samples, heartbeat_s, retry, print_fn).run()


def _check_arguments(study, trials, metric, pruner, fid_samples, heartbeat_s, startup, warmup, overrides) -> None:
    if not study or study in (".", "..") or "/" in study or "\\" in study or study != study.strip():
        raise ConfigError(f"--study must be a plain directory name (no '/'), got '{study}'")
    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if metric not in METRICS:
        raise ConfigError(f"--metric must be one of {', '.join(METRICS)}, got '{metric}'")
    if pruner not in PRUNERS:
        raise ConfigError(f"--pruner must be one of {', '.join(PRUNERS)}, got '{pruner}'")
    if fid_samples is not None and fid_samples < 2:
        raise ConfigError(f"--fid-samples must be at least 2 (FID needs a covariance), got {fid_samples}")
    if fid_samples is not None and metric != "fid":
        raise ConfigError("--fid-samples applies to --metric fid only")
    if not isinstance(heartbeat_s, int) or heartbeat_s < 1:
        raise ConfigError(f"--heartbeat-s must be a whole number of seconds, at least 1, got {heartbeat_s}")
    if startup < 0 or warmup < 0:
        raise ConfigError("--prune-startup-trials and --prune-warmup-steps must be 0 or more")
    if "run.name" in overrides:
        raise ConfigError("tune names each trial's run itself (<study>/trial-NNNN under run.root); leave out "
                          "--run.name")


@contextlib.contextmanager
def _quiet_optuna(optuna):
    """Optuna's own log lines and its experimental-feature warnings off: tune prints one line per trial."""
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(before)


class _Search:
    """One process's share of a study: trials until the study has enough, then the results."""

    def __init__(self, study, name, study_dir, url, wanted, params, recipe, overrides, root, metric, fid_samples,
                 heartbeat_s, retry, print_fn):
        self.study, self.name, self.dir, self.url, self.wanted = study, name, study_dir, url, wanted
        self.params, self.recipe, self.overrides, self.root = params, recipe, overrides, root
        self.metric, self.fid_samples, self.heartbeat_s = metric, fid_samples, heartbeat_s
        self.retry, self.print = retry, print_fn

    def counts(self):
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        by = {s: [t for t in trials if t.state == s] for s in TrialState}
        return by[TrialState.COMPLETE] + by[TrialState.PRUNED], by[TrialState.RUNNING], by[TrialState.WAITING]

    def run(self) -> dict:
        import optuna

        ran, failures, waiting_said = 0, 0, False
        finished, running, _ = self.counts()
        if len(finished) >= self.wanted:
            self.print(f"study '{self.name}' has its {self.wanted} trial(s) ({len(finished)} complete or pruned); "
                       f"nothing to run")
        while True:
            optuna.storages.fail_stale_trials(self.study)  # a dead process's trial: failed, and queued again
            finished, running, _ = self.counts()
            if len(finished) >= self.wanted:
                break
            if len(finished) + len(running) >= self.wanted:  # the rest are running elsewhere
                if not waiting_said:
                    numbers = ", ".join(str(t.number) for t in running)
                    self.print(f"waiting for trial(s) {numbers}, running in other processes (a dead process's "
                               f"trial is taken over once its heartbeat is {2 * self.heartbeat_s} s old)")
                    waiting_said = True
                time.sleep(min(self.heartbeat_s, 5))
                continue
            waiting_said = False
            outcome, error = self.run_trial()
            ran += outcome != "surplus"
            self.write_results()
            if outcome == "preempted":
                self.print(f"SIGTERM: {error}; run the same command again to resume the study")
                return self.summary(ran, preempted=True)
            failures = failures + 1 if outcome == "failed" else 0
            if failures >= FAILURES_IN_A_ROW:
                raise TuneError(f"{failures} trials in a row failed; the last: {error}")
        summary = self.write_results()
        self.print_best(summary)
        return self.summary(ran)

    def summary(self, ran: int, preempted: bool = False) -> dict:
        summary = json.loads((self.dir / TRIALS_FILE).read_text())
        summary["ran_here"] = ran
        if preempted:
            summary["preempted"] = True
        return summary

    # ---- one trial -------------------------------------------------------------------------------

    def run_trial(self) -> tuple[str, str | None]:
        """Asks Optuna for a trial (a queued one first), trains and scores it; ('complete' | 'pruned' |
        'failed' | 'surplus' | 'preempted', the reason where it did not complete)."""
        import optuna

        seen = {}

        def objective(trial):
            seen["trial"] = trial
            return self.objective(trial)

        try:
            self.study.optimize(objective, n_trials=1, catch=(GenfoundryError, _Surplus), gc_after_trial=False)
        except (KeyboardInterrupt, _Preempted) as e:
            trial = seen.get("trial")
            frozen = trial and next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
            if frozen and frozen.state == optuna.trial.TrialState.FAIL:  # queued again: the next command resumes it
                self.retry(self.study, frozen)
            if isinstance(e, KeyboardInterrupt):
                self.write_results()
                raise
            return "preempted", str(e)
        finally:
            gc.collect()
        trial = seen["trial"]
        frozen = next(t for t in self.study.get_trials(deepcopy=False) if t.number == trial.number)
        if frozen.state == optuna.trial.TrialState.COMPLETE:
            return "complete", None
        if frozen.state == optuna.trial.TrialState.PRUNED:
            return "pruned", None
        error = frozen.user_attrs.get("error", "failed")
        if frozen.user_attrs.get("surplus"):
            return "surplus", error
        if frozen.user_attrs.get("stop"):
            raise TuneError(error)
        return "failed", error

    def objective(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        from genfoundry import api

        active = sorted(t.number for t in self.study.get_trials(
            deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))
        if trial.number in active and active.index(trial.number) >= self.wanted:
            why = f"not run: the study already had its {self.wanted} trials finished or running"
            trial.set_user_attr("surplus", True)
            trial.set_user_attr("error", why)
            raise _Surplus(why)
        run_name = trial.user_attrs.get("run") or f"{self.name}/trial-{trial.number:04d}"
        first = trial.user_attrs.get("first_trial", trial.number)
        run_dir = self.root / run_name
        if "run" not in trial.user_attrs and (run_dir / "config.toml").exists():
            why = (f"{run_dir} already holds a run that study '{self.name}' does not know (was its database "
                   f"deleted, or another --storage given?); move it away, or name another --study")
            trial.set_user_attr("error", why)
            trial.set_user_attr("stop", True)
            raise TuneError(why)
        # Before any training: a retry of this trial (its process died) resumes this run directory.
        trial.set_user_attr("run", run_name)
        trial.set_user_attr("first_trial", first)
        try:
            values = {p.key: p.suggest(trial) for p in self.params}
            cfg = config_lib.load(self.recipe, {**self.overrides, **values, "run.name": run_name})
            shown = "  ".join(f"{k}={_short(v)}" for k, v in values.items())
            again = f"  (trial {first} again: it stopped before it finished)" if first != trial.number else ""
            finished, _, _ = self.counts()
            self.print(f"trial {trial.number} ({len(finished) + 1}/{self.wanted}): {shown}  -> {run_dir}{again}")
            t0 = time.perf_counter()
            result = api.train(cfg, self.trial_print, on_report=self.reporter(trial))
            if "preempted" in result:
                raise _Preempted(f"trial {trial.number} saved its state at step {result['preempted']}")
            value = self.score(trial, cfg, run_dir)
        except optuna.TrialPruned as e:
            self.print(f"trial {trial.number}: {e}")
            raise
        except GenfoundryError as e:
            trial.set_user_attr("error", str(e))
            self.print(f"trial {trial.number} failed: {e}")
            raise
        best = self._best_value()
        note = "" if best is None or value >= best else "  (best so far)"
        self.print(f"trial {trial.number}: {self.metric} {value:.5g} in {time.perf_counter() - t0:.0f} s{note}")
        return value

    def _best_value(self) -> float | None:
        try:
            return self.study.best_value
        except ValueError:  # no complete trial yet
            return None

    def trial_print(self, *args, **kwargs) -> None:
        self.print("  " + " ".join(map(str, args)), **kwargs)

    def reporter(self, trial):
        """The on_report callback: at each validation after step 0, the score so far goes to the pruner."""
        import optuna

        def on_report(step: int, values: dict) -> None:
            if step == 0 or "val_loss" not in values:
                return
            value = _loss_score(self.metric, values.get("val_loss"), values.get("val_loss_ema"))
            trial.report(math.inf if value is None else value, step)
            if trial.should_prune():
                shown = "not finite" if value is None else f"{value:.5g}"
                raise optuna.TrialPruned(f"pruned at step {step} (validation {shown}, behind the other trials)")

        return on_report

    def score(self, trial, cfg: Config, run_dir: Path) -> float:
        """The finished trial's score: its final validation losses (final/model.json), or its FID."""
        from genfoundry import api

        meta = api.final_meta(run_dir)
        raw, ema = meta.get("val_loss"), meta.get("val_loss_ema")
        trial.set_user_attr("val_loss", raw)
        trial.set_user_attr("val_loss_ema", ema)
        if self.metric == "fid":
            n = self.fid_samples or cfg.eval.num_samples
            result = api.evaluate(run_dir, num_samples=n, print_fn=self.trial_print)
            trial.set_user_attr("fid", result["fid"])
            trial.set_user_attr("fid_weights", result["weights"])
            value = result["fid"]
        else:
            value = _loss_score(self.metric, raw, ema)
        if value is None or not math.isfinite(value):
            raise TuneError(f"trial {trial.number}'s {self.metric} is not finite (the run diverged)")
        return float(value)

    # ---- the results -----------------------------------------------------------------------------

    def write_results(self) -> dict:
        """trials.json, best.toml and report.html of the study as its storage holds it now."""
        summary = self.trials_summary()
        write_atomic(self.dir / TRIALS_FILE, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        if summary["best"] is not None:
            write_atomic(self.dir / BEST_FILE, self.best_toml(summary).encode())
        try:
            from genfoundry.report import build_report

            build_report(self.dir)
        except GenfoundryError as e:  # the study and its results stand; the page is a view of them
            self.print(f"warning: the study's report.html was not written: {e}")
        return summary

    def trials_summary(self) -> dict:
        from optuna.trial import TrialState

        now = datetime.datetime.now()
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            end = t.datetime_complete or (now if t.state == TrialState.RUNNING else None)
            run = t.user_attrs.get("run")
            first = t.user_attrs.get("first_trial")
            rows.append({
                "number": t.number, "state": t.state.name, "params": t.params,
                "value": _finite_or_none(t.value) if t.state == TrialState.COMPLETE else None,
                "run": run, "run_dir": str(self.root / run) if run else None,
                "duration_s": (end - t.datetime_start).total_seconds() if end and t.datetime_start else None,
                "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
                "retry_of": first if first is not None and first != t.number else None,
                "pruned_at_step": max(t.intermediate_values) if t.state == TrialState.PRUNED and t.intermediate_values
                else None,
                "intermediate": [[s, _finite_or_none(v)] for s, v in sorted(t.intermediate_values.items())],
                **{k: _finite_or_none(t.user_attrs.get(k)) for k in ("val_loss", "val_loss_ema", "fid")},
                "error": t.user_attrs.get("error") if t.state == TrialState.FAIL else None,
            })
        again = {}
        for r in rows:
            if r["retry_of"] is not None:
                again.setdefault(r["retry_of"], []).append(r["number"])
        for r in rows:  # a trial failed without an error of its own: its process died, or was stopped
            if r["state"] == "FAIL" and r["error"] is None:
                first = r["retry_of"] if r["retry_of"] is not None else r["number"]
                later = [n for n in again.get(first, []) if n > r["number"]]
                r["error"] = "stopped before it finished (its process died or was interrupted)" + (
                    f"; run again as trial {later[0]}" if later else "")
        complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
        best = min(complete, key=lambda r: (r["value"], r["number"])) if complete else None
        counts = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
        return {"format_version": FORMAT_VERSION, "study": self.name, "storage": shown_url(self.url),
                "metric": self.metric, "direction": "minimize", "trials_wanted": self.wanted,
                "search": {p.key: p.spec() for p in self.params}, "counts": counts,
                "best": None if best is None else {k: best[k] for k in ("number", "value", "params", "run", "run_dir")},
                "updated": now.astimezone().isoformat(timespec="seconds"), "trials": rows}

    def best_config(self, summary: dict) -> Config:
        best = summary["best"]
        return config_lib.load(self.recipe, {**self.overrides, **best["params"], "run.name": best["run"]})

    def best_toml(self, summary: dict) -> str:
        best = summary["best"]
        done = summary["counts"]["COMPLETE"] + summary["counts"]["PRUNED"]
        searched = "  ".join(f"{k}={_short(v)}" for k, v in best["params"].items())
        header = [f"# genfoundry tune: the best trial of study '{self.name}' ({done} of {self.wanted} trials "
                  f"complete or pruned)",
                  f"# trial {best['number']}: {self.metric} {best['value']:.6g} (the lowest), run {best['run_dir']}",
                  f"# searched: {searched}",
                  f"# train it as a new run: {self.train_command()}"]
        return "\n".join(header) + "\n" + config_lib.dumps(self.best_config(summary))

    def train_command(self) -> str:
        return f"genfoundry train --config {self.dir / BEST_FILE} --run.name={self.name}-best"

    def print_best(self, summary: dict) -> None:
        c = summary["counts"]
        self.print(f"study '{self.name}': {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed; "
                   f"{self.dir / TRIALS_FILE}, report {self.dir / 'report.html'}")
        if summary["best"] is None:
            self.print("no trial completed, so there is no best config")
            return
        best = summary["best"]
        self.print(f"best: trial {best['number']}, {self.metric} {best['value']:.6g}; its config "
                   f"({self.dir / BEST_FILE}):\n")
        self.print(config_lib.dumps(self.best_config(summary)))
        self.print(f"train it: {self.train_command()}")


def _loss_score(metric: str, raw, ema) -> float | None:
    """val_loss_ema: the EMA's; otherwise the lower of the raw and EMA weights' (finite ones only)."""
    finite = lambda v: v is not None and math.isfinite(v)  # noqa: E731
    if metric == "val_loss_ema":
        return ema if finite(ema) else None
    values = [v for v in (raw, ema) if finite(v)]
    return min(values) if values else None


def _finite_or_none(value):
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _text(value)
