"""Typed configuration: one dataclass per component, TOML recipes, `--section.key=value` overrides."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import io
import json
import textwrap
import tokenize
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from genfoundry.errors import ConfigError
from genfoundry.sampling.solvers import GUIDANCE_SCHEDULES, SCHEDULES, SOLVERS

FORMAT_VERSION = 1
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SAMPLE_PRECISIONS = PRECISIONS + ("fp8",)  # fp8: float8 matrix products in the blocks (genfoundry.sampling.fast)
SAMPLE_COMPILE = ("auto", "none", "compile", "graphs")


@dataclass
class RunConfig:
    name: str = "run"            # run directory name under `root`
    root: str = "runs"           # parent directory of run directories
    seed: int = 0                # seeds data order, noise, time sampling and initialisation
    device: str = "auto"         # 'auto' picks the accelerator torch reports, else e.g. 'cpu', 'cuda:1'
    threads: int = 0             # CPU threads for torch; 0 leaves torch's default

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"run.threads must be 0 (torch's default) or more, got {self.threads}")


@dataclass
class DataConfig:
    source: str = "mnist"        # 'mnist', 'fashion-mnist', an image folder, or a packed shard set (path or URL)
    split: str = "train"         # split used for training (named datasets)
    val_split: str = "test"      # split the validation batch comes from (named datasets; others hold out data.holdout)
    resolution: int = 0          # image side; 0: a shard set's packed side, or the side its images share
                                 # when all are one square size, else 64
    channels: int = 0            # 1 or 3 for folders and shards (0: the images' majority, converting the rest)
    hflip: bool = False          # random horizontal flips (off for digits)
    workers: int = 2             # CPU decode worker processes for shard sets
    fast_jpeg: bool = False      # libjpeg-turbo's fast chroma upsampling (~40% faster decode, ~41 dB PSNR)
    holdout: float = 0.05        # folders and shard sets: fraction of images kept out of training to validate on
                                 # (at most train.val_batch_size); 0 validates on training images

    def __post_init__(self):
        if self.channels not in (0, 1, 3):
            raise ConfigError(f"data.channels must be 1 or 3 (or 0 for the data's own), got {self.channels}")
        if self.resolution and self.resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8 (or 0 for the data's own), got {self.resolution}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be 0 or more, got {self.workers}")
        if not 0.0 <= self.holdout < 1.0:
            raise ConfigError(f"data.holdout must be in [0, 1), got {self.holdout}")


@dataclass
class ModelConfig:
    preset: str = "DiT-T/4"      # key of genfoundry.models.MODELS
    class_dropout: float = 0.1   # probability of dropping the label (classifier-free guidance)

    def __post_init__(self):
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"model.class_dropout must be in [0, 1), got {self.class_dropout}")


@dataclass
class DiffusionConfig:
    time_sampling: str = "logit-normal"  # key of genfoundry.diffusion.TIME_SAMPLERS
    logit_mean: float = 0.0              # logit-normal location
    logit_std: float = 1.0               # logit-normal scale
    loss_weighting: str = "uniform"      # key of genfoundry.diffusion.LOSS_WEIGHTINGS
    min_snr_gamma: float = 5.0           # min-snr weighting: the SNR at which the weight stops growing
    sigma_data: float = 0.5              # edm weighting: the data's standard deviation

    def __post_init__(self):
        if self.logit_std <= 0:
            raise ConfigError(f"diffusion.logit_std must be positive, got {self.logit_std}")
        for name in ("min_snr_gamma", "sigma_data"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"diffusion.{name} must be positive, got {getattr(self, name)}")


@dataclass
class DistillConfig:
    teacher: str = ""            # a finished run whose guided velocity the network learns (guidance distillation:
                                 # one pass then gives what the teacher gives in two, at the guidance of this
                                 # run's [sample] section); the student starts from the teacher's weights. Empty: off
    weights: str = "ema"         # the teacher's weights: ema | model

    def __post_init__(self):
        if self.weights not in ("ema", "model"):
            raise ConfigError(f"distill.weights must be 'ema' or 'model', got '{self.weights}'")


@dataclass
class TrainConfig:
    global_batch_size: int = 128    # images per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 0       # images per forward/backward on one rank; 0: the largest that fits
                                    # (searched on an accelerator; global / world on a CPU)
    steps: int = 1000               # total optimizer steps
    time_budget_s: float = 0.0      # also stop after this much training time (evaluation, samples and saves
                                    # not counted); the schedule then spans the steps the budget allows; 0: none
    lr: float = 1e-3                # peak learning rate (at lr_reference_batch when lr_scaling is not none)
    lr_scaling: str = "none"        # none | sqrt | linear: lr x (global_batch_size / lr_reference_batch)^(1/2 or 1)
    lr_reference_batch: int = 256   # the global batch `lr` was tuned at
    warmup_steps: int = 100         # linear warm-up from 0 to lr
    lr_schedule: str = "constant"   # after warm-up: constant | cosine (to min_lr_ratio x lr at the end) |
                                    # wsd (warm-up, stable, then a linear decay over the last decay_fraction)
    decay_fraction: float = 0.2     # wsd: fraction of the run the decay takes
    min_lr_ratio: float = 0.0       # cosine, wsd: the final learning rate as a fraction of lr
    weight_decay: float = 0.0       # AdamW decoupled weight decay
    beta1: float = 0.9              # AdamW decay rate of the gradient mean
    beta2: float = 0.99             # AdamW decay rate of the squared-gradient mean
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    ema_halflife_kimg: float = 10.0  # EMA half-life in thousands of images
    ema_rampup: float = 0.05        # half-life is at most this fraction of images seen; 0 disables
    precision: str = "auto"         # auto (bf16 on a CUDA GPU that has it, else fp32) | fp32 | bf16 | fp16
                                    # (fp16 uses a dynamic loss scaler); a resumed run keeps what it resolved
    loss_scale_init: float = 2.0**16  # fp16: the loss scale at the start
    loss_scale_growth_interval: int = 1000  # fp16: steps without overflow before the scale doubles
    fp16_max_overflows: int = 20    # fp16: consecutive overflowing steps before the run switches to fp32
    log_every: int = 50             # steps between metric reports
    val_every: int = 200            # steps between fixed-noise validation losses
    val_batch_size: int = 256       # held-out images in the fixed validation batch
    sample_every: int = 500         # steps between sample grids (0 disables)
    report_every: int = 500         # steps between rebuilds of RUN/report.html, to watch a live run (0: at the end only)
    tensorboard: bool = True        # TensorBoard event files in the run directory (needs the tensorboard package)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.lr_schedule not in ("constant", "cosine", "wsd"):
            raise ConfigError(f"train.lr_schedule must be constant, cosine or wsd, got '{self.lr_schedule}'")
        if self.lr_scaling not in ("none", "sqrt", "linear"):
            raise ConfigError(f"train.lr_scaling must be none, sqrt or linear, got '{self.lr_scaling}'")
        for name in ("decay_fraction", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("global_batch_size", "steps", "lr_reference_batch", "log_every", "val_batch_size", "fp16_max_overflows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr must be positive, got {self.lr}")
        if self.micro_batch_size < 0:
            raise ConfigError(f"train.micro_batch_size must be 0 (automatic) or more, got {self.micro_batch_size}")
        for name in ("val_every", "loss_scale_growth_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("time_budget_s", "warmup_steps", "weight_decay", "grad_clip", "ema_halflife_kimg", "ema_rampup",
                     "sample_every", "report_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more, got {getattr(self, name)}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.loss_scale_init <= 0:
            raise ConfigError(f"train.loss_scale_init must be positive, got {self.loss_scale_init}")


@dataclass
class CheckpointConfig:
    full_every: int = 500           # steps between full training states (weights, optimizer, data position,
                                    # RNG: what resumes exactly); also at the end; 0 disables
    snapshot_every: int = 0         # steps between EMA snapshots (safetensors: enough to sample and evaluate); 0 disables
    keep: int = 2                   # newest full states kept on local disk
    keep_snapshots: int = 3         # newest snapshots kept on local disk
    remote: str = ""                # fsspec URL (s3://..., file:///..., memory://...) the local tier is copied to
                                    # in the background; empty: none
    keep_remote: int = 2            # newest full states and snapshots each kept at the remote
    upload_retries: int = 3         # attempts of one upload before it is reported as failed (training goes on)
    asynchronous: bool = True       # stage to host memory between two steps and write in the background; false:
                                    # training waits until each checkpoint is on disk
    sharded: str = "auto"           # auto (torch.distributed.checkpoint shards under FSDP2, else one file) | full
    grace_s: float = 60.0           # after SIGTERM: time to finish the step, save and exit 0
    nonfinite_rollback: int = 3     # steps in a row with a non-finite loss or gradient (each skipped) before the run
                                    # rolls back to the last good full state; 0: skip only

    def __post_init__(self):
        if self.sharded not in ("auto", "full"):
            raise ConfigError(f"checkpoint.sharded must be auto or full, got '{self.sharded}'")
        for name in ("keep", "keep_snapshots", "keep_remote", "upload_retries"):
            if getattr(self, name) < 1:
                raise ConfigError(f"checkpoint.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("full_every", "snapshot_every", "nonfinite_rollback"):
            if getattr(self, name) < 0:
                raise ConfigError(f"checkpoint.{name} must be 0 or more, got {getattr(self, name)}")
        if self.grace_s <= 0:
            raise ConfigError(f"checkpoint.grace_s must be positive, got {self.grace_s}")


COMM_HOOKS = ("none", "torus", "topk", "powersgd")


@dataclass
class ParallelConfig:
    strategy: str = "auto"          # auto (ddp on several ranks) | none | ddp | fsdp | hsdp
    replicate: int = 0              # hsdp: replica groups (0: one per node); shards within each
    compile: bool = False           # torch.compile (what compile_scope says)
    compile_scope: str = "blocks"   # blocks: each transformer block (works with every strategy) | loss: the
                                    # whole loss (noise, network, error) as one graph, forward and backward
    cuda_graphs: bool = False       # compile_scope=loss on CUDA: replay the compiled step as CUDA graphs
                                    # (mode reduce-overhead), for small models that launch-bound the GPU
    activation_checkpointing: bool = False  # recompute block activations in backward to save memory
    timeout_s: float = 300.0        # a collective waiting longer than this fails the run (a dead rank)
    comm_hook: str = "none"         # ddp gradient all-reduce: none | torus (2D) | topk | powersgd
    torus_rows: int = 0             # torus: rows of the rows x cols rank grid (0: near-square)
    topk_ratio: float = 0.01        # topk: fraction of gradient entries sent per step
    topk_warmup_steps: int = 100    # topk: steps over which the kept fraction decays to topk_ratio
    powersgd_rank: int = 4          # powersgd: rank of the low-rank gradient approximation
    powersgd_warmup_steps: int = 100  # powersgd: plain all-reduce steps before compressing (at least 2)

    def __post_init__(self):
        if self.strategy not in ("auto", "none", "ddp", "fsdp", "hsdp"):
            raise ConfigError(f"parallel.strategy must be auto, none, ddp, fsdp or hsdp, got '{self.strategy}'")
        if self.compile_scope not in ("blocks", "loss"):
            raise ConfigError(f"parallel.compile_scope must be blocks or loss, got '{self.compile_scope}'")
        if self.cuda_graphs and not (self.compile and self.compile_scope == "loss"):
            raise ConfigError("parallel.cuda_graphs needs parallel.compile=true and parallel.compile_scope=loss")
        if self.comm_hook not in COMM_HOOKS:
            raise ConfigError(f"parallel.comm_hook must be one of {', '.join(COMM_HOOKS)}, got '{self.comm_hook}'")
        if self.timeout_s <= 0:
            raise ConfigError(f"parallel.timeout_s must be positive, got {self.timeout_s}")
        if not 0.0 < self.topk_ratio <= 1.0:
            raise ConfigError(f"parallel.topk_ratio must be in (0, 1], got {self.topk_ratio}")
        for name in ("replicate", "torus_rows", "topk_warmup_steps", "powersgd_warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"parallel.{name} must be 0 or more, got {getattr(self, name)}")
        if self.powersgd_rank < 1:
            raise ConfigError(f"parallel.powersgd_rank must be at least 1, got {self.powersgd_rank}")


@dataclass
class SampleConfig:
    sampler: str = "heun"        # ODE solver: euler | heun | dpm++2m (genfoundry.sampling.solvers.SOLVERS)
    steps: int = 16              # solver steps (heun uses 2 network evaluations per step but the last)
    schedule: str = "uniform"    # time grid: uniform | shift | karras | logsnr
    shift: float = 0.0           # the shift schedule's s, t' = s t / (1 + (s - 1) t); 0: sqrt(C H W / 4096)
    cfg_scale: float = 1.5       # classifier-free guidance weight; 1 disables guidance
    guidance_schedule: str = "constant"  # how the weight varies with t: constant | linear | cosine (same mean)
    guidance_min_t: float = 0.0  # guidance only at times t in [guidance_min_t, guidance_max_t] (t = 1 is noise);
    guidance_max_t: float = 1.0  # elsewhere the conditional velocity alone (a guidance interval)
    per_class: int = 8           # images per class in a grid
    batch_size: int = 256        # images per network call
    seed: int = 0                # base seed; image i uses noise from (seed, i)
    precision: str = "auto"      # network precision while sampling: auto (bf16 on a CUDA GPU that has it,
                                 # else fp32) | fp32 | bf16 | fp16 | fp8 (float8 products in the blocks, on
                                 # GPUs of compute capability 8.9+); weights are cast once, not autocast
    compile: str = "auto"        # auto (graphs on CUDA, compile on other accelerators, none on a CPU) |
                                 # none | compile | graphs (torch.compile replayed as CUDA graphs)

    def __post_init__(self):
        if self.precision not in SAMPLE_PRECISIONS:
            raise ConfigError(f"sample.precision must be one of {', '.join(SAMPLE_PRECISIONS)}, got '{self.precision}'")
        if self.compile not in SAMPLE_COMPILE:
            raise ConfigError(f"sample.compile must be one of {', '.join(SAMPLE_COMPILE)}, got '{self.compile}'")
        for key, names in (("sampler", SOLVERS), ("schedule", SCHEDULES), ("guidance_schedule", GUIDANCE_SCHEDULES)):
            if getattr(self, key) not in names:
                raise ConfigError(f"sample.{key} must be one of {', '.join(names)}, got '{getattr(self, key)}'")
        if self.shift < 0:
            raise ConfigError(f"sample.shift must be positive, or 0 for the resolution's, got {self.shift}")
        if not 0.0 <= self.guidance_min_t <= self.guidance_max_t <= 1.0:
            raise ConfigError(f"sample.guidance_min_t and guidance_max_t must satisfy 0 <= min <= max <= 1, got "
                              f"{self.guidance_min_t} and {self.guidance_max_t}")
        for name in ("steps", "per_class", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"sample.{name} must be at least 1, got {getattr(self, name)}")

    def solver_settings(self) -> dict:
        """The keyword arguments of genfoundry.sampling.generate that this section sets."""
        return dict(seed=self.seed, steps=self.steps, sampler=self.sampler, cfg_scale=self.cfg_scale,
                    batch_size=self.batch_size, precision=self.precision, schedule=self.schedule, shift=self.shift,
                    guidance_schedule=self.guidance_schedule, compile=self.compile,
                    guidance_interval=(self.guidance_min_t, self.guidance_max_t))


@dataclass
class EvalConfig:
    num_samples: int = 1000      # generated images scored by FID/KID
    reference: str = ""          # dataset name, image folder or shard set; empty means the training source
    split: str = "train"         # reference split (named datasets)
    kid_subset_size: int = 1000  # KID subset size (clipped to the set sizes)
    resize: str = "pil-bicubic-uint8"  # how images reach 299 px for the network: pil-bicubic-uint8 | clean
    max_reference_images: int = 0      # the first N reference images only (0: all)

    # Not a field: the conventions genfoundry.features.RESIZES implements, for checks and --help.
    RESIZE_CONVENTIONS = ("pil-bicubic-uint8", "clean")

    def __post_init__(self):
        if self.num_samples < 2:
            raise ConfigError(f"eval.num_samples must be at least 2 (FID needs a covariance), got {self.num_samples}")
        if self.kid_subset_size < 2:
            raise ConfigError(f"eval.kid_subset_size must be at least 2, got {self.kid_subset_size}")
        if self.resize not in self.RESIZE_CONVENTIONS:
            raise ConfigError(f"eval.resize must be one of {', '.join(self.RESIZE_CONVENTIONS)}, got '{self.resize}'")
        if self.max_reference_images < 0:
            raise ConfigError(f"eval.max_reference_images must be 0 (all) or more, got {self.max_reference_images}")


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Sections whose values change what is trained; a resumed run must match on these.
TRAINING_SECTIONS = ("data", "model", "diffusion")
TRAINING_KEYS = ("global_batch_size", "lr", "lr_scaling", "lr_reference_batch", "warmup_steps", "lr_schedule",
                 "decay_fraction", "min_lr_ratio", "weight_decay", "beta1", "beta2", "grad_clip",
                 "ema_halflife_kimg", "ema_rampup", "precision")
# Keys of those sections that do not: the images and their order do not depend on the worker count.
NON_TRAINING_KEYS = {"data": ("workers",)}


# Keys that moved: a config or command line that still names one is told the new name.
MOVED_KEYS = {"train.checkpoint_every": "checkpoint.full_every", "train.keep_checkpoints": "checkpoint.keep"}


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, base=None):
    """Builds a Config (or another config of sections, as `base`) from nested dicts, checking every key
    and coercing every value."""
    cfg = base or Config()
    flat = {}
    for section, values in data.items():
        if section == "format_version":
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"'{section}' must be a [section] table")
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return apply_overrides(cfg, flat)


def _section_fields(cfg: Config) -> dict[str, dict[str, dataclasses.Field]]:
    return {f.name: {g.name: g for g in dataclasses.fields(getattr(cfg, f.name))} for f in dataclasses.fields(cfg)}


@functools.cache
def field_docs(top: type = None) -> dict[str, dict[str, str]]:
    """{section: {key: description}} of `top` (Config, or another config of sections such as
    CurateConfig), read from the comment beside each field in the file that defines it (and the comment
    lines aligned under it), so that those comments stay the one place a key is described."""
    top = top or Config
    source = Path(inspect.getsourcefile(top)).read_text(encoding="utf-8")
    lines = source.splitlines()
    comments = {tok.start[0]: (tok.start[1], tok.string.lstrip("#").strip())
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    sections = {f.default_factory.__name__: (f.name, {g.name for g in dataclasses.fields(f.default_factory)})
                for f in dataclasses.fields(top)}
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in sections):
            continue
        name, keys = sections[node.name]
        section = docs[name] = {}
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name) and item.target.id in keys):
                continue
            line = item.end_lineno
            column, text = comments.get(line, (None, ""))
            parts = [text]
            # A comment alone on the next line, aligned with this one, continues it.
            while line + 1 in comments and comments[line + 1][0] == column and lines[line].lstrip().startswith("#"):
                line += 1
                parts.append(comments[line][1])
            section[item.target.id] = " ".join(p for p in parts if p)
    return docs


def keys_help(width: int = 100, top: type = None) -> str:
    """Every key by section with its default and description, as `train --help` lists them."""
    top = top or Config
    docs, defaults = field_docs(top), to_dict(top())
    pairs = {s: {k: f"{k} = {_toml_value(v)}" for k, v in values.items()} for s, values in defaults.items()}
    column = min(28, max(len(p) for values in pairs.values() for p in values.values())) + 4
    out = []
    for section, values in pairs.items():
        out.append(f"[{section}]")
        for key, pair in values.items():
            text = textwrap.wrap(docs[section][key], max(30, width - column), break_on_hyphens=False,
                                 break_long_words=False)
            if len(pair) > column - 4:  # a long key and value: its description starts on the next line
                out.append(f"  {pair}")
            else:
                out.append(f"  {pair:<{column - 2}}{text.pop(0) if text else ''}".rstrip())
            out.extend(" " * column + more for more in text)
    return "\n".join(out)


def _coerce(dotted: str, value, annotation):
    kind = {"int": int, "float": float, "str": str, "bool": bool}[annotation] if isinstance(annotation, str) else annotation
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{dotted} must be true or false, got '{value}'")
    if kind is int:
        if isinstance(value, bool):
            raise ConfigError(f"{dotted} must be an integer, got '{value}'")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{dotted} must be an integer, got '{value}'") from None
        if not as_float.is_integer():
            raise ConfigError(f"{dotted} must be an integer, got '{value}'")
        return int(as_float)
    if kind is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{dotted} must be a number, got '{value}'") from None
    return str(value)


def apply_overrides(cfg: Config, overrides: dict[str, object]) -> Config:
    """Returns a new Config with `{'section.key': value}` applied; values may be strings from the CLI."""
    sections = _section_fields(cfg)
    valid = [f"{s}.{k}" for s, keys in sections.items() for k in keys]
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if dotted in MOVED_KEYS:
            raise ConfigError(f"config key '{dotted}' is now '{MOVED_KEYS[dotted]}'")
        if section not in sections or key not in sections[section]:
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint}")
        data[section][key] = _coerce(dotted, value, sections[section][key].type)
    try:
        return type(cfg)(**{s: type(getattr(cfg, s))(**v) for s, v in data.items()})
    except ConfigError:
        raise
    except ValueError as e:  # a component rejected a value in __post_init__
        raise ConfigError(str(e)) from None


def recipe_path(name: str) -> Path:
    """A path to a TOML file, or the name of a recipe shipped in genfoundry/recipes/."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        return path
    shipped = resources.files("genfoundry") / "recipes" / f"{name}.toml"
    if shipped.is_file():
        return Path(str(shipped))
    available = sorted(p.name[:-5] for p in (resources.files("genfoundry") / "recipes").iterdir() if p.name.endswith(".toml"))
    if path.suffix == ".toml":
        raise ConfigError(f"recipe file '{name}' does not exist (or is not a file)")
    raise ConfigError(f"no recipe '{name}': give a .toml path or one of {available}")


def load_file(base, path: str | Path, what: str = "recipe"):
    """`base` (a Config or another config of sections) with the keys of the TOML file at `path`."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} '{path}': {getattr(e, 'strerror', None) or e}") from None
    return from_dict(data, base)


def load(recipe: str | None = None, overrides: dict[str, object] | None = None) -> Config:
    cfg = load_file(Config(), recipe_path(recipe)) if recipe else Config()
    return apply_overrides(cfg, overrides or {})


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--train.lr=3e-4', '--run.name', 'x'] -> {'train.lr': '3e-4', 'run.name': 'x'}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unexpected argument '{arg}'; overrides look like --section.key=value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, value = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override '{arg}' has no value; write {arg}=VALUE")
        out[key] = value
        i += 1
    return out


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def dumps(cfg: Config) -> str:
    lines = [f"format_version = {FORMAT_VERSION}"]
    for section, values in to_dict(cfg).items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


def source_identity(source: str) -> str:
    """What a data source names, whatever its spelling: a local path resolved (absolute, no trailing
    '/'), a URL without trailing '/', a dataset name as it is."""
    if "://" in source:
        return source.rstrip("/")
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def training_identity(cfg: Config) -> dict:
    """The part of the config that a resumed run must share with the run it continues."""
    data = to_dict(cfg)
    data["data"]["source"] = source_identity(cfg.data.source)
    ident = {s: {k: v for k, v in data[s].items() if k not in NON_TRAINING_KEYS.get(s, ())}
             for s in TRAINING_SECTIONS}
    ident["train"] = {k: data["train"][k] for k in TRAINING_KEYS}
    ident["seed"] = cfg.run.seed
    return ident


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(training_identity(cfg), sort_keys=True).encode()).hexdigest()[:16]


def value_of(cfg: Config, dotted: str) -> str:
    """A config value as an override would write it: `value_of(cfg, "train.lr")` -> "0.001"."""
    section, _, key = dotted.partition(".")
    value = getattr(getattr(cfg, section), key)
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def identity_diff(a: Config, b: Config) -> list[str]:
    """Dotted keys where two configs differ in what they train."""
    ia, ib = training_identity(a), training_identity(b)
    keys = []
    for section in ia:
        if isinstance(ia[section], dict):
            keys += [f"{section}.{k}" for k in ia[section] if ia[section][k] != ib[section].get(k)]
        elif ia[section] != ib[section]:
            keys.append(f"run.{section}")
    return keys

