"""Configs are data: dataclass schemas, YAML recipes, dotted `key=value` overrides.

Each stage defines one schema built from the shared pieces below; `load_config` merges the
schema's defaults (the stage's embedded recipe), an optional YAML file and the command-line
overrides, type-checks them with OmegaConf and runs every `validate()` so that a bad config
stops with one line naming the key before any work starts.

Values are read as YAML 1.2 (core schema), not YAML 1.1 as PyYAML and OmegaConf read them: only
`true`/`false` are booleans, so `mixed_precision: no` is the string "no", not False. On the
command line, a key whose schema type is `str` takes its text as written (`null` aside), so
that no YAML rule (booleans, numbers, dates) can change the word a user typed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vitcore.atomic import atomic_write_text

T = TypeVar("T")

# Widths from the ViT paper's Table 1 (B, L, H) and DeiT (Ti, S); Pico and Nano are ours, for
# tests and the 2-core CPU demo. A variant name is "<width>/<patch>", e.g. "B/16" or "Nano/8".
WIDTHS: dict[str, dict[str, int]] = {
    "Pico": dict(dim=64, depth=2, heads=2),
    "Nano": dict(dim=128, depth=6, heads=4),
    "Ti": dict(dim=192, depth=12, heads=3),
    "S": dict(dim=384, depth=12, heads=6),
    "B": dict(dim=768, depth=12, heads=12),
    "L": dict(dim=1024, depth=24, heads=16),
    "H": dict(dim=1280, depth=32, heads=16),
}


def parse_variant(variant: str) -> tuple[str, int]:
    """ "B/16" -> ("B", 16); a ValueError naming the known widths for anything else."""
    width, _, patch = variant.partition("/")
    if width not in WIDTHS or not patch.isdigit() or int(patch) <= 0:
        known = ", ".join(f"{w}/<patch>" for w in WIDTHS)
        raise ValueError(f"unknown variant {variant!r}; expected one of {known}")
    return width, int(patch)


class ConfigError(ValueError):
    """A config problem, phrased as `<dotted.key>: <what is wrong>`."""


def check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class ModelConfig:
    variant: str = "Nano/8"  # "<width>/<patch>", widths in WIDTHS
    image_size: int = 64  # training resolution (square); position embeddings are stored for it
    dropout: float = 0.0
    drop_path: float = 0.0

    @property
    def patch_size(self) -> int:
        return parse_variant(self.variant)[1]

    def validate(self, key: str) -> None:
        try:
            parse_variant(self.variant)
        except ValueError as e:
            raise ConfigError(f"{key}.variant: {e}") from None
        check(self.image_size > 0 and self.image_size % self.patch_size == 0, f"{key}.image_size",
              f"{self.image_size} is not a positive multiple of the patch size {self.patch_size}")
        for name in ("dropout", "drop_path"):
            check(0.0 <= getattr(self, name) < 1.0, f"{key}.{name}", "must be in [0, 1)")


@dataclass
class DataConfig:
    shards: str = "data/imagenette-112/train"  # shard dir (with index.json), path/brace pattern or pipe: URL
    batch_size: int = 64  # per process, per micro-step
    num_workers: int = 2
    shuffle_buffer: int = 1000
    epoch_samples: int | None = None  # read from index.json unless given (needed for pipe:/http URLs)

    def validate(self, key: str) -> None:
        check(bool(self.shards), f"{key}.shards", "is empty")
        check(self.batch_size > 0, f"{key}.batch_size", "must be positive")
        check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        check(self.shuffle_buffer >= 0, f"{key}.shuffle_buffer", "must be >= 0")
        check(self.epoch_samples is None or self.epoch_samples > 0, f"{key}.epoch_samples", "must be positive")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adam | adamw | sgd
    lr: float = 1e-3  # peak learning rate, reached after warmup
    min_lr: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam(w) only
    momentum: float = 0.9  # sgd only
    layer_decay: float = 1.0  # layer-wise lr decay (BEiT/MAE); 1.0 = off
    weight_decay: float = 0.05
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant, after warmup
    grad_clip: float = 1.0  # global norm; 0 disables
    accum_steps: int = 1  # micro-batches per optimizer step

    def validate(self, key: str) -> None:
        check(self.name in ("adam", "adamw", "sgd"), f"{key}.name", f"{self.name!r} is not one of adam, adamw, sgd")
        check(self.lr > 0, f"{key}.lr", "must be positive")
        check(0 <= self.min_lr <= self.lr, f"{key}.min_lr", "must be in [0, lr]")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"{key}.betas",
              "must be two numbers in [0, 1)")
        check(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
        check(0 < self.layer_decay <= 1, f"{key}.layer_decay", "must be in (0, 1] (1 disables)")
        check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        check(self.schedule in ("cosine", "linear", "constant"), f"{key}.schedule",
              f"{self.schedule!r} is not one of cosine, linear, constant")
        check(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 disables clipping)")
        check(self.accum_steps >= 1, f"{key}.accum_steps", "must be >= 1")


@dataclass
class RunConfig:
    out_dir: str = "runs/run"  # each stage's schema sets its own
    steps: int = 1000  # optimizer steps
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    log_every: int = 10
    image_every: int = 250  # TensorBoard image grid every N steps and at the end; 0 disables
    ckpt_every: int = 250
    keep_last: int = 2  # complete checkpoints kept on disk
    resume: str = "auto"  # auto (latest complete checkpoint in out_dir, if any) | never | <checkpoint dir>
    max_nonfinite: int = 5  # stop after this many non-finite losses in a row
    compile: bool = False  # torch.compile the model
    eval_every: int = 0  # evaluate on eval.shards every N steps (and always at the end); 0: at the end only
    # The metric that picks checkpoints/best, a metrics.jsonl key: val/<name> from the evaluation
    # (val/top1, val/loss, ...) or probe/<name> from the monitor (probe/linear_top1_cls, ...);
    # null: val/top1 when the run evaluates, else no best checkpoint
    best_metric: str | None = None
    best_mode: str | None = None  # max | min: which direction of best_metric is better; null: the task's
    # How long a rank waits in a collective before the run fails (torch's default is 10 min for NCCL):
    # covers the slowest wait there is, rank 0 reading a checkpoint or a shard index on a slow filesystem.
    collective_timeout_s: int = 1800
    # Where scalars and images go besides metrics.jsonl (always written): tensorboard, wandb (pip
    # install -e '.[wandb]'), both or none ([]); see vitcore/train/sinks.py
    log_with: list[str] = field(default_factory=lambda: ["tensorboard"])

    def validate(self, key: str) -> None:
        check(self.steps > 0, f"{key}.steps", "must be positive")
        check(self.mixed_precision in ("no", "bf16", "fp16"), f"{key}.mixed_precision",
              f"{self.mixed_precision!r} is not one of no, bf16, fp16")
        for name in ("log_every", "ckpt_every", "keep_last", "max_nonfinite"):
            check(getattr(self, name) > 0, f"{key}.{name}", "must be positive")
        check(self.image_every >= 0, f"{key}.image_every", "must be >= 0 (0 disables)")
        check(self.eval_every >= 0, f"{key}.eval_every", "must be >= 0 (0: only at the end)")
        check(self.collective_timeout_s > 0, f"{key}.collective_timeout_s", "must be positive")
        check(self.best_metric is None or (self.best_metric.partition("/")[0] in ("val", "probe")
                                           and "/" in self.best_metric.strip("/")),
              f"{key}.best_metric", f"{self.best_metric!r} is not val/<name> or probe/<name>")
        check(self.best_mode in (None, "max", "min"), f"{key}.best_mode", f"{self.best_mode!r} is not one of max, min")
        check(bool(self.resume), f"{key}.resume", "must be auto, never or a checkpoint directory")
        unknown = [n for n in self.log_with if n not in ("tensorboard", "wandb")]
        check(not unknown, f"{key}.log_with", f"{unknown[0] if unknown else ''!r} is not one of tensorboard, wandb "
                                              "(metrics.jsonl is always written)")
        check("wandb" not in self.log_with or importlib.util.find_spec("wandb") is not None, f"{key}.log_with",
              "wandb is not installed: pip install -e '.[wandb]'")


@dataclass
class EvalConfig:
    shards: str | None = None  # validation shard dir (with index.json); None: no evaluation
    batch_size: int = 128  # per process
    num_workers: int = 2

    def validate(self, key: str) -> None:
        check(self.shards is None or bool(self.shards), f"{key}.shards", "is empty (use null for no evaluation)")
        check(self.batch_size > 0, f"{key}.batch_size", "must be positive")
        check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")


@dataclass
class MonitorConfig:
    """Probes of the encoder's features during training (see `vitcore.eval.probes`), on labelled shards
    apart from the training data: pretraining needs no labels, the monitor only a small labelled set."""

    train_shards: str | None = None  # labelled shards the probes fit on (a train subset); None: no monitor
    val_shards: str | None = None  # labelled shards they are scored on (same classes)
    every: int = 250  # steps between probes (also at step 0, the random-init reference, and at the end)
    batch_size: int = 128  # per process, for feature extraction
    num_workers: int = 2
    knn_k: int = 20  # DINO's weighted kNN: k nearest, votes exp(cosine / T)
    knn_temperature: float = 0.07
    probe_steps: int = 300  # L-BFGS iterations of the logistic-regression probe
    images: int = 4  # validation images whose attention maps go to TensorBoard; 0: none

    def validate(self, key: str) -> None:
        check((self.train_shards is None) == (self.val_shards is None), f"{key}.val_shards" if self.train_shards
              else f"{key}.train_shards", "give both monitor.train_shards and monitor.val_shards (or neither)")
        for name in ("train_shards", "val_shards"):
            check(getattr(self, name) != "", f"{key}.{name}", "is empty (use null for no monitor)")
        for name in ("every", "batch_size", "knn_k", "probe_steps"):
            check(getattr(self, name) > 0, f"{key}.{name}", "must be positive")
        check(self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        check(self.knn_temperature > 0, f"{key}.knn_temperature", "must be positive")
        check(self.images >= 0, f"{key}.images", "must be >= 0 (0: no attention maps)")

    @property
    def enabled(self) -> bool:
        return self.train_shards is not None


@dataclass
class StageConfig:
    """The sections every stage has; a stage's schema extends it (with its own defaults, its
    embedded recipe, and sections of its own) and may add a cross-section `validate()`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out shards for the task's evaluation
    monitor: MonitorConfig = field(default_factory=MonitorConfig)  # kNN/linear probes of the encoder's features


def load_config(schema: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults of `schema` <- YAML file at `path` <- `key=value` overrides, checked and validated."""
    try:
        cfg = OmegaConf.structured(schema)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"--config: no such file: {path}")
            recipe = _load_yaml(path)
            for key, value in recipe.items():  # OmegaConf's own message would not name the section
                if isinstance(cfg.get(key), DictConfig) and not isinstance(value, DictConfig):
                    raise ConfigError(f"{key}: must be a section of keys, got {value!r}")
            cfg = OmegaConf.merge(cfg, recipe)
        cfg = OmegaConf.merge(cfg, _parse_overrides(schema, overrides))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(e)) from None
    _validate_tree(obj)
    return obj  # type: ignore[return-value]


def _load_yaml(path: str | Path) -> DictConfig:
    """A recipe file as a mapping; YAML syntax errors and non-mapping files are one ConfigError line."""
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.load(f, Loader=_Yaml12Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"--config: {path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(loaded, dict | None):
        raise ConfigError(f"--config: {path} must hold a mapping of sections (model:, data:, ...), not a list")
    return OmegaConf.create(loaded or {})


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with the YAML 1.2 core schema's plain scalars: null, true/false, ints
    (decimal, 0o, 0x) and floats (1e-3 too); everything else, yes/no/on/off included, is a string.
    A key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r}",
                                                        key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text)  # int("0755") is 755, as in 1.2


_Yaml12Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in (  # the YAML 1.2 spec, section 10.3.2; ints before floats
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("float", r"[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|[-+]?\.(inf|Inf|INF)|\.(nan|NaN|NAN)",
     list("-+.0123456789")),
):
    _Yaml12Loader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), _first)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)


def _parse_overrides(schema: type, overrides: list[str] | tuple[str, ...]) -> DictConfig:
    """`key=value` arguments as a config to merge. Values are YAML 1.2, except for keys whose
    schema type is str: those take the text as typed (`run.resume=never`, `run.out_dir=1e3`), or
    None for `null`, or what a quoted YAML string says."""
    parsed = OmegaConf.create()
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"{item}: overrides are written key=value, e.g. optim.lr=3e-4")
        if _is_str_field(schema, key) and text[:1] not in ("'", '"'):
            value = None if text in ("null", "Null", "NULL", "~") else text
        else:
            try:
                value = yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a safe loader)
            except yaml.YAMLError:
                raise ConfigError(f"{key}: {text!r} is not a valid YAML value") from None
        OmegaConf.update(parsed, key, value)
    return parsed


def _is_str_field(schema: type, key: str) -> bool:
    """Whether the dotted `key` names a field of the dataclass `schema` typed str or str | None."""
    kind: Any = schema
    for name in key.split("."):
        if not dataclasses.is_dataclass(kind):
            return False
        kind = typing.get_type_hints(kind).get(name)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return set(typing.get_args(kind)) <= {str, type(None)}
    return kind is str


def _validate_tree(cfg: Any) -> None:
    """Validate each section under its key, then the stage's cross-section checks."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and hasattr(value, "validate"):
            value.validate(f.name)
    if hasattr(cfg, "validate"):
        cfg.validate()


def _one_line(e: OmegaConfBaseException) -> str:
    """OmegaConf's messages span lines and bury the key; lead with the key instead."""
    key = getattr(e, "full_key", None) or "config"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return f"{key}: {first}"


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain nested dicts and lists (for checkpoints and JSON), never pickled objects."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Any, path: str | Path) -> None:
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
