"""Typed run configuration: defaults → config file → command-line overrides.

A config file is a Python file of top-level assignments such as::

    model = dict(backbone="conv4", margin=-0.01)
    train = dict(epochs=200, milestones=[60, 120])

It is *parsed*, never executed: every value must be a literal (numbers, strings,
booleans, None, lists, tuples, ``{...}`` or ``dict(...)``), so a config file cannot
run code. Each section maps to a dataclass below whose defaults are the reference
protocol (``docs/protocol.md``); unknown keys and wrong types are errors that name
the key and suggest close valid names.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import pprint
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass
class DataConfig:
    """Where the images are and how they are stored and presented to the model."""

    dataset: str = "demo"  # a key of negmargin.datasets.DATASETS
    root: str = "data/demo"
    image_size: int = 84  # side of the square network input
    channels: int = 3  # 3 = RGB, 1 = grayscale
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, on the 0-255 scale
    std: tuple[float, ...] = IMAGENET_STD
    # Test transform: resize the short side to this, then centre-crop image_size.
    # None = int(image_size * 1.15), the reference's 96 for 84.
    test_resize: int | None = None
    # Short side of the *training* images in the packed cache (never upscaled; 0 =
    # keep the source size). See negmargin/datasets/cache.py for why 256.
    train_store_size: int = 256
    cache_dir: str | None = None  # None = <root>/.negmargin_cache, or the user cache
    prepare_workers: int = 0  # processes that decode images; 0 = all cores
    skip_bad_images: bool = False  # skip unreadable files instead of failing
    options: dict[str, Any] = field(default_factory=dict)  # reader-specific options


@dataclass
class ModelConfig:
    backbone: str = "conv4"  # a key of negmargin.backbones.BACKBONES
    head: Literal["cosine", "softmax"] = "cosine"
    # Rows of the training head. None = the number of base classes in the data.
    # The reference configs say 100 for miniImageNet although it has 64 classes.
    num_classes: int | None = None
    margin: float = 0.0  # ≤ 0: the target logit is T·(s_y − m)
    temperature: float = 10.0
    # A positive margin is outside the Neg-Margin method (it is the usual
    # large-margin loss); allowed only for the margin study of bench/omniglot.py.
    allow_positive_margin: bool = False


@dataclass
class AugmentConfig:
    """The reference training augmentation, applied batched on the device."""

    enabled: bool = True  # False: train on the test transform
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    # "cv2": bilinear without antialiasing, as the reference's mmcv/cv2 backend;
    # "pil": PIL/torchvision bilinear, antialiased when shrinking.
    interpolation: Literal["cv2", "pil"] = "cv2"


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64  # global batch; split across processes under torchrun
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[int, ...] = (60, 120)  # epochs where lr *= gamma
    gamma: float = 0.1
    warmup_iters: int = 3000  # linear warm-up from warmup_ratio·lr
    warmup_ratio: float = 0.25
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50  # iterations
    checkpoint_interval: int = 50  # epochs between epoch_N.pth files
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Mixed precision. "fp32" is the reference; "bf16" autocasts the backbone.
    # "auto" = bf16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on where measured faster
    compile: bool = False  # torch.compile the backbone
    workers: int = 1  # background threads that read and augment batches
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    # Under torchrun: "none" keeps lr for the global batch (per-process batch =
    # batch_size / world size); "linear" multiplies lr by the world size and
    # keeps batch_size per process.
    ddp_scaling: Literal["none", "linear"] = "none"
    max_iters_per_epoch: int | None = None  # cut epochs short (smoke tests)


@dataclass
class EvalConfig:
    """One meta-test setting: which episodes, and how many fine-tune steps."""

    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    n_episodes: int = 2000
    episode_seed: int = 0  # draws the episodes; independent of the model seed
    steps: int | None = None  # None = 150 for 5-way 1-shot, 600 for 5-way 5-shot


@dataclass
class ValConfig(EvalConfig):
    n_episodes: int = 100
    interval: int = 5  # epochs


@dataclass
class FinetuneConfig:
    """The per-episode head fine-tune of the meta-test (reference values)."""

    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 4
    temperature: float = 5.0
    seed: int = 0  # head init and support shuffling
    chunk_size: int = 0  # episodes fine-tuned at once; 0 = chosen from memory and cores
    threads: int = 0  # chunks fine-tuned at once on a CPU, one core each; 0 = all of torch's threads
    feature_batch_size: int = 128  # images per forward pass when extracting


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    val: ValConfig = field(default_factory=ValConfig)
    meta_test: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    name: str = "run"  # the config file's stem; names the work dir

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> Config:
        return _build(cls, raw, "", source)

    def validate(self) -> Config:
        _check_values(self)
        return self

    @property
    def test_resize(self) -> int:
        d = self.data
        return d.test_resize if d.test_resize is not None else int(d.image_size * 1.15)


def default_finetune_steps(n_support: int) -> int:
    """Fine-tune steps for a support set of ``n_support`` images.

    The protocol fixes 150 steps for 5-way 1-shot (5 images) and 600 for 5-way
    5-shot (25 images); in between and beyond, 24 steps per support image,
    clipped to [150, 600]. ``predict`` uses the same rule for uneven shots.
    """
    return int(min(600, max(150, 24 * n_support)))


def eval_steps(ev: EvalConfig) -> int:
    return ev.steps if ev.steps is not None else default_finetune_steps(ev.n_way * ev.n_shot)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a config file, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        near = _near_files(path)
        hint = f"; did you mean {near}?" if near else ""
        raise ConfigError(f"config file '{path}' does not exist{hint}")
    raw = parse_config_file(path)
    raw.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(raw, item)
    return Config.from_dict(raw, source=str(path)).validate()


def parse_config_file(path: Path) -> dict[str, Any]:
    """Top-level ``name = literal`` assignments of a config file, as a dict."""
    text = path.read_text(encoding="utf-8")
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid Python syntax: {exc.msg}") from None
    out: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            raise ConfigError(
                f"{path}:{node.lineno}: a config file may only contain assignments "
                "'name = value' (it is read, never executed)"
            )
        out[node.targets[0].id] = _literal(node.value, path)
    return out


def _literal(node: ast.AST, path: Path) -> Any:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
        if node.args or any(k.arg is None for k in node.keywords):
            raise ConfigError(f"{path}:{node.lineno}: use dict(key=value, ...) only")
        return {k.arg: _literal(k.value, path) for k in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k, path): _literal(v, path) for k, v in zip(node.keys, node.values)}
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, path) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Div, ast.Mult, ast.Add, ast.Sub)):
        left, right = _literal(node.left, path), _literal(node.right, path)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            ops = {
                ast.Div: lambda a, b: a / b,
                ast.Mult: lambda a, b: a * b,
                ast.Add: lambda a, b: a + b,
                ast.Sub: lambda a, b: a - b,
            }
            return ops[type(node.op)](left, right)
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ConfigError(
            f"{path}:{getattr(node, 'lineno', '?')}: only literal values are allowed in a "
            f"config file, got '{ast.unparse(node)}'"
        ) from None


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one ``section.key=value`` override (value parsed as a Python literal)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, text = item.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text  # a bare word is a string
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
    node[parts[-1]] = value


# --------------------------------------------------------------------------- typing


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or 'config'}' must be a dict")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(prefix + n for n in near)}?" if near else ""
        raise ConfigError(
            f"{source}: unknown config key '{prefix}{key}'{hint} (valid keys: {', '.join(names)})"
        )
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{prefix}{name}", source)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, source: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source)
    origin, args = get_origin(hint), get_args(hint)

    def fail(expected: str) -> ConfigError:
        return ConfigError(
            f"{source}: config key '{key}' expects {expected}, got {value!r} ({type(value).__name__})"
        )

    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if origin is Literal:
        if value not in args:
            raise fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise fail("true/false (True or False)")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise fail("an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail("a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise fail("a string")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise fail(f"a list of {len(args)} values")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a dict")
        return dict(value)
    raise TypeError(f"unsupported config annotation {hint!r} for {key}")  # a bug, not user input


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value


def _check_values(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    positive = {
        "data.image_size": cfg.data.image_size,
        "train.epochs": cfg.train.epochs,
        "train.batch_size": cfg.train.batch_size,
        "train.log_interval": cfg.train.log_interval,
        "train.checkpoint_interval": cfg.train.checkpoint_interval,
        "finetune.batch_size": cfg.finetune.batch_size,
        "finetune.feature_batch_size": cfg.finetune.feature_batch_size,
        "val.interval": cfg.val.interval,
    }
    for section in ("val", "meta_test"):
        ev = getattr(cfg, section)
        for name in ("n_way", "n_shot", "n_query", "n_episodes"):
            positive[f"{section}.{name}"] = getattr(ev, name)
        if ev.steps is not None:
            positive[f"{section}.steps"] = ev.steps
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be a positive integer, got {value}")
    for key in ("chunk_size", "threads"):
        if getattr(cfg.finetune, key) < 0:
            raise ConfigError(
                f"config key 'finetune.{key}' must be 0 (automatic) or a positive integer, "
                f"got {getattr(cfg.finetune, key)}"
            )
    for section in ("val", "meta_test"):
        if getattr(cfg, section).n_way < 2:
            raise ConfigError(f"config key '{section}.n_way' must be at least 2")
    if cfg.data.channels not in (1, 3):
        raise ConfigError(f"config key 'data.channels' must be 1 or 3, got {cfg.data.channels}")
    for key in ("mean", "std"):
        if len(getattr(cfg.data, key)) != cfg.data.channels:
            raise ConfigError(
                f"config key 'data.{key}' needs {cfg.data.channels} values (one per channel), "
                f"got {len(getattr(cfg.data, key))}"
            )
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError("config key 'data.std' must be positive")
    if cfg.model.margin > 0 and not cfg.model.allow_positive_margin:
        raise ConfigError(
            f"config key 'model.margin' must be ≤ 0 for Neg-Margin, got {cfg.model.margin} "
            "(a positive margin is a different method; set model.allow_positive_margin=True "
            "to study it)"
        )
    if cfg.model.num_classes is not None and cfg.model.num_classes <= 0:
        raise ConfigError("config key 'model.num_classes' must be positive or None")
    if cfg.model.temperature <= 0 or cfg.finetune.temperature <= 0:
        raise ConfigError("temperatures (model.temperature, finetune.temperature) must be > 0")
    lo, hi = cfg.augment.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"config key 'augment.crop_scale' must satisfy 0 < lo ≤ hi ≤ 1, got {lo, hi}")
    lo, hi = cfg.augment.crop_ratio
    if not 0 < lo <= hi:
        raise ConfigError(f"config key 'augment.crop_ratio' must satisfy 0 < lo ≤ hi, got {lo, hi}")
    if cfg.train.lr <= 0 or cfg.finetune.lr <= 0:
        raise ConfigError("learning rates (train.lr, finetune.lr) must be > 0")
    if cfg.train.workers < 0 or cfg.data.prepare_workers < 0:
        raise ConfigError("worker counts (train.workers, data.prepare_workers) must be ≥ 0")
    if list(cfg.train.milestones) != sorted(cfg.train.milestones):
        raise ConfigError(f"config key 'train.milestones' must be increasing, got {cfg.train.milestones}")
    if cfg.test_resize < cfg.data.image_size:
        raise ConfigError(
            f"config key 'data.test_resize' ({cfg.test_resize}) must be ≥ data.image_size "
            f"({cfg.data.image_size})"
        )


def _near_files(path: Path) -> str:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return ""
    names = [p.name for p in folder.iterdir() if p.suffix == ".py"]
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return str(folder / near[0]) if near else ""


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as a config file that loads back to the same run."""
    from .fileio import atomic_write_text

    lines = [f"# Resolved config of run '{cfg.name}' (written by negmargin; loads as is).\n"]
    for section, values in cfg.to_dict().items():
        lines.append(f"{section} = {pprint.pformat(values, sort_dicts=False, width=88)}\n")
    atomic_write_text(path, "".join(lines))
