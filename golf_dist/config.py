"""The typed config: YAML files, per-stage sections, dotted command-line overrides, validation.

A config file holds the keys below (every one optional; defaults are the paper's recipe) plus two
optional sections `f:` and `g:` whose keys apply only to that stage, e.g. `g: {train: {steps: 200000}}`.
Command-line overrides (`train.lr=5e-4`) apply last. Every key is checked against this schema before
any work starts: an unknown key, a wrong type or an impossible value raises ConfigError (exit 2)
naming the key. Values are parsed with `yaml.safe_load` and coerced by the field's declared type;
nothing is ever evaluated.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from golf_dist.configs import config_path  # the bundled files
from golf_dist.errors import ConfigError

STAGES = ("f", "g")

# The choice fields' allowed values, declared once: validation and the loaders read them with typing.get_args
Loader = Literal["auto", "dali", "torch"]  # golf_dist.data.loaders.resolve_loader
OnBadSample = Literal["error", "skip"]
Schedule = Literal["exp", "cosine", "constant"]  # golf_dist.training.optim.make_scheduler
UnrollWeighting = Literal["uniform", "linear", "last"]  # golf_dist.losses.iterate_weights
ContentLoss = Literal["mse", "psnr"]  # golf_dist.losses.CONTENT_LOSSES
MixedPrecision = Literal["no", "bf16", "fp16", "auto"]  # auto: golf_dist.perf.speed.auto_precision
NonFinite = Literal["skip", "stop"]
Switch = Literal["auto", "try", "on", "off"]  # golf_dist.perf.speed


@dataclass
class DataConfig:
    shards: str = "GOPRO_shards"  # a folder with manifest.json, made by data_prep/shard_gopro.py
    train_split: str = "train"
    val_split: str = "test"
    crop: int = 256  # side of the square training window, the same for blur and sharp
    flips: bool = True  # random horizontal and vertical flips, the same for blur and sharp
    batch_size: int = 4  # global: summed over ranks and accumulation steps
    num_workers: int = 2  # loader processes per rank
    loader: Loader = "auto"  # auto (DALI when it imports and builds, else torch) | dali | torch
    crops_per_frame: int = 1  # windows cut from each decoded frame pair (decode once, crop k times)
    on_bad_sample: OnBadSample = "error"  # error: stop naming shard and key | skip: skip, count, log the count
    cache_dir: str | None = None  # local cache for s3:// shards; default ~/.cache/golf_dist/shards


@dataclass
class LossConfig:
    perceptual_weight: float = 5e-6  # lambda of L = Lc + lambda * Lp; 0 turns the VGG term off
    vgg_weights: str | None = None  # vgg11_bn-6002323d.pth; default: the PyTorch hub cache
    content: ContentLoss = "mse"  # Lc: the paper's pixel MSE, or psnr (each image's -PSNR: golf_dist.losses.psnr_loss)


@dataclass
class TrainConfig:
    steps: int = 500_000  # optimizer steps of the stage
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps to lr over the first steps
    schedule: Schedule = "exp"  # after warm-up: exp (paper: lr * gamma ** (lr_decays * progress)) | cosine | constant
    lr_gamma: float = 0.3  # exp schedule: the lr falls to lr * lr_gamma ** lr_decays at the last step
    lr_decays: float = 11.0
    grad_clip: float = 0.0  # clip the global gradient norm to this (0 = off; the norm is logged either way)
    ema_decay: float = 0.0  # exponential moving average of the weights (0 = off); validation and exports use it
    beta1: float = 0.9
    beta2: float = 0.999
    unroll: int = 5  # N, the unrolled G steps of Eq. 4 (stage g)
    # the weights of the N iterates in Eq. 4: uniform (the paper's mean) | linear (iterate i weighs i: later
    # iterates count more, so G learns to converge) | last (iterate N alone: G's N-th step is the one that lands)
    unroll_weighting: UnrollWeighting = "uniform"
    gradient_checkpointing: bool = True  # checkpoint each unrolled G step (stage g)
    grad_accum: int = 1
    mixed_precision: MixedPrecision = "no"  # no | bf16 | fp16 | auto (bf16 where the device has fast bf16 kernels)
    log_every: int = 100
    val_every: int = 5000
    checkpoint_every: int = 5000
    keep_last: int = 3  # checkpoints kept besides the best by validation PSNR
    f_weights: str | None = None  # stage g: trained F; default OUTPUT_DIR/f.safetensors
    resume_from: str | None = None  # a checkpoint dir or an MLflow artifact URI; default: newest in DIR
    # load a checkpoint that cannot be verified: an artifact URI's without file_sha256, or (GOLF_CHECKPOINT_KEY set)
    # one without an HMAC; a digest or HMAC that does not match is refused even so
    resume_unverified: bool = False
    # a step whose loss or gradient norm is NaN/Inf: skip (no optimizer step, no EMA update; counted in the metric
    # nonfinite_steps_skipped) | stop (a named error at the first); either stops after nonfinite_patience in a row
    nonfinite: NonFinite = "skip"
    nonfinite_patience: int = 10
    hang_timeout_s: float = 1800.0  # no progress for this long: dump every thread's stack, exit 124 (0 = off)


@dataclass
class ValConfig:
    max_pairs: int = 32  # validation during training: the first pairs of the val split
    sample_images: int = 2  # (blur | output | sharp) triplets logged at each validation


@dataclass
class EvalConfig:
    iterations: int = 3  # G iterations at test time (paper: 3)


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLFLOW_TRACKING_URI wins; default sqlite:///mlflow.db (cwd)
    experiment: str = "golf-optimizer"
    log_checkpoints: bool = False  # also upload each checkpoint to the run's artifact store


@dataclass
class SpeedConfig:
    """golf_dist/perf/speed.py. Each switch: auto (try where a CUDA GPU runs the work, off on a CPU, where results stay
    exact) | try (on, turned off with a warning when it fails or disagrees with eager at start-up) | on (on; its
    failure fails the run) | off."""

    compile: Switch = "auto"  # torch.compile F and G (G compiled once, reused by every unrolled step)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: tracing without code generation), or
    #                                    "module:function", a custom backend imported from an importable module
    channels_last: Switch = "auto"  # NHWC weights and inputs (cuDNN's fast convolutions): auto | on | off
    tf32: bool = True  # TF32 for fp32 convolutions and matmuls on GPUs that have it (no effect on a CPU)
    cudnn_benchmark: Switch = "auto"  # auto: on for evaluation, deblurring and benchmarks, off in training, whose
    #                                resume is promised bitwise exact | on | off
    fused_adam: Switch = "auto"  # Adam's fused CUDA kernel: auto | on | off
    fused_norm: Switch = (
        "auto"  # InstanceNorm + ReLU as one Triton kernel (golf_dist/perf/fused_norm.py): auto (on with
    )
    #                           CUDA and Triton, unless compile is on) | on (the PyTorch fallback where the kernel
    #                           cannot run) | off
    cuda_graphs: Switch = "auto"  # CUDA graphs through compile (reduce-overhead) on CUDA: auto (off until measured on
    #                            a GPU) | on | off; on needs compile


@dataclass
class Config:
    seed: int = 0
    output_dir: str = "runs/gopro"
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)


# ---------------------------------------------------------------------------------- building


def load_config(path: str | Path | None, stage: str | None = None, overrides: list[str] = ()) -> Config:
    """Read `path` (a file or a bundled name; default: demo), merge the `stage` section, apply overrides, validate."""
    path = config_path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(raw).__name__}")
    if stage is not None and stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, not {stage!r}")
    sections = {s: raw.pop(s, None) or {} for s in STAGES}
    for s, section in sections.items():
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: section '{s}' must be a mapping of keys")
        _build(Config, section, prefix=f"{s}.")  # unknown keys in either stage section are errors
    merged = _deep_merge(raw, sections[stage]) if stage else raw
    for item in overrides:
        _apply_override(merged, item)
    cfg = _build(Config, merged, prefix="")
    validate(cfg, stage)
    return cfg


def parse_overrides(items: list[str]) -> list[str]:
    """Check the `key=value` shape early so a stray argument is reported as such."""
    for item in items:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=5e-4)")
    return list(items)


def _apply_override(tree: dict, item: str) -> None:
    key, _, text = item.partition("=")
    key = key.strip()
    field_type = _field_type(key)  # raises for an unknown key, naming it
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    if isinstance(value, bool) and _is_text(field_type):
        value = text.strip()  # YAML 1.1 reads no/yes/off/on as booleans: train.mixed_precision=no means "no"
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _field_type(dotted: str) -> Any:
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise ConfigError(_unknown_key(".".join(parts[: i + 1]), hints))
        cls = hints[part]
        if i < len(parts) - 1 and not dataclasses.is_dataclass(cls):
            raise ConfigError(f"config key '{'.'.join(parts[: i + 1])}' has no sub-keys")
    return cls


def _unknown_key(dotted: str, hints: dict) -> str:
    leaf = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, list(hints), n=1)
    hint = f" (did you mean '{dotted[: -len(leaf)]}{close[0]}'?)" if close else ""
    return f"unknown config key '{dotted}'{hint}"


def _is_text(tp: Any) -> bool:
    """str, a Literal of words, or either of them Optional."""
    if tp is str or typing.get_origin(tp) is Literal:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and any(_is_text(a) for a in typing.get_args(tp))


def _build(cls: Any, values: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}' must be a mapping, not {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(_unknown_key(dotted, hints))
        kwargs[key] = _coerce(hints[key], value, dotted)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, f"{dotted}.")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(args[0], value, dotted)
    wrong = ConfigError(f"config key '{dotted}' must be {getattr(tp, '__name__', 'str')}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if tp is str or origin is Literal:  # a Literal's choices are checked by validate(), naming them
        if isinstance(value, bool) and dotted.startswith("speed."):  # YAML 1.1 reads on/off as booleans
            return "on" if value else "off"
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise TypeError(f"unsupported config type {tp} for {dotted}")


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------- checking


def validate(cfg: Config, stage: str | None = None) -> None:
    """Impossible values, each named by its key. Checks that need the data live in the trainer."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {what}, got {_get(cfg, key)!r}")

    for key, choices in choice_fields().items():  # every Literal field, its values from the schema
        need(_get(cfg, key) in choices, key, f"must be {_one_of(choices)}")
    need(cfg.seed >= 0, "seed", "must be 0 or more")
    need(cfg.data.crop >= 32, "data.crop", "must be at least 32 (the VGG features pool by 32)")
    need(cfg.data.batch_size >= 1, "data.batch_size", "must be at least 1")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be 0 or more")
    need(cfg.data.crops_per_frame >= 1, "data.crops_per_frame", "must be at least 1")
    need(cfg.loss.perceptual_weight >= 0, "loss.perceptual_weight", "must be 0 or more")
    need(
        not (cfg.speed.cuda_graphs == "on" and cfg.speed.compile == "off"),
        "speed.cuda_graphs",
        "on needs speed.compile auto or on (CUDA graphs are recorded through torch.compile)",
    )
    need(
        cfg.speed.compile_backend in ("inductor", "aot_eager", "eager", "cudagraphs")
        or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", cfg.speed.compile_backend) is not None,
        "speed.compile_backend",
        "must be inductor, aot_eager, eager, cudagraphs or module:function",
    )
    t = cfg.train
    need(t.steps >= 1, "train.steps", "must be at least 1")
    need(t.lr > 0, "train.lr", "must be positive")
    need(0 < t.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")
    need(t.lr_decays >= 0, "train.lr_decays", "must be 0 or more")
    need(t.warmup_steps >= 0, "train.warmup_steps", "must be 0 or more")
    need(t.warmup_steps < t.steps, "train.warmup_steps", f"must be smaller than train.steps={t.steps}")
    need(t.grad_clip >= 0, "train.grad_clip", "must be 0 (off) or a positive norm")
    need(0 <= t.ema_decay < 1, "train.ema_decay", "must be in [0, 1) (0 = off)")
    need(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    need(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    need(t.unroll >= 1, "train.unroll", "must be at least 1")
    need(t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(t.nonfinite_patience >= 1, "train.nonfinite_patience", "must be at least 1")
    need(t.hang_timeout_s >= 0, "train.hang_timeout_s", "must be 0 (off) or a positive number of seconds")
    for key in ("log_every", "val_every", "checkpoint_every", "keep_last"):
        need(getattr(t, key) >= 1, f"train.{key}", "must be at least 1")
    need(cfg.val.max_pairs >= 1, "val.max_pairs", "must be at least 1")
    need(cfg.val.sample_images >= 0, "val.sample_images", "must be 0 or more")
    need(cfg.eval.iterations >= 0, "eval.iterations", "must be 0 or more")
    need(bool(cfg.output_dir), "output_dir", "must not be empty")
    need(bool(cfg.data.shards), "data.shards", "must not be empty")


def choices_of(tp: Any) -> tuple[str, ...]:
    """The allowed values of a Literal type (e.g. golf_dist.config.Loader)."""
    return typing.get_args(tp)


def choice_fields(cls: Any = Config, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Dotted key -> allowed values, for every Literal field of the schema."""
    out: dict[str, tuple[str, ...]] = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(choice_fields(tp, f"{prefix}{name}."))
        elif typing.get_origin(tp) is Literal:
            out[f"{prefix}{name}"] = choices_of(tp)
    return out


def _one_of(choices: tuple[str, ...]) -> str:
    return f"{', '.join(choices[:-1])} or {choices[-1]}"


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Config, resolved: dict[str, Any] | None = None) -> dict:
    """The config as nested dicts; `resolved` replaces dotted keys by what the run made of them (a record)."""
    tree = dataclasses.asdict(cfg)
    for dotted, value in (resolved or {}).items():
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lr': 1e-3}} -> {'train.lr': 1e-3}, e.g. for MLflow params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
