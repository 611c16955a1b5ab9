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
import math
import pprint
import types
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from .errors import ConfigError
from .finetune import FinetuneConfig

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def in_range(section: str, obj: Any, name: str, lo: float, hi: float = math.inf, *, open_lo: bool = False,
             open_hi: bool = False) -> None:  # fmt: skip
    """``obj.name`` (each value of it, for a tuple) within [lo, hi] — ``open_lo``/``open_hi``
    exclude the bound; None passes — or a ConfigError naming the key and the range."""
    value = getattr(obj, name)
    for v in value if isinstance(value, (tuple, list)) else [value]:
        if v is None:
            continue
        low_ok = v > lo if open_lo else v >= lo
        high_ok = v < hi if open_hi else v <= hi
        if not (low_ok and high_ok and math.isfinite(v)):
            left, right = "(" if open_lo else "[", ")" if open_hi else "]"
            top = "∞" if hi == math.inf else f"{hi:g}"
            raise ConfigError(
                f"config key '{section}.{name}' must be in {left}{lo:g}, {top}{right}, got {value!r}"
            )


def _positive(section: str, obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise ConfigError(f"config key '{section}.{name}' must be a positive integer, got {value}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images are and how they are stored and presented to the model."""

    dataset: str = ""  # a key of negmargin.datasets.DATASETS; a config must name one
    root: str = ""  # the dataset's folder (--data-root)
    image_size: int = 84  # side of the square network input
    channels: int = 3  # 3 = RGB, 1 = grayscale
    mean: tuple[float, ...] = IMAGENET_MEAN  # per channel, on the 0-255 scale
    std: tuple[float, ...] = IMAGENET_STD
    # Test transform: resize the short side to this, then centre-crop image_size.
    # None = int(image_size * 1.15), the reference's 96 for 84 (resolved at run start).
    test_resize: int | None = None
    # Short side of the *training* images in the packed cache (never upscaled; 0 =
    # keep the source size). See negmargin/datasets/cache.py for why 256.
    train_store_size: int = 256
    cache_dir: str | None = None  # None = <root>/.negmargin_cache, or the user cache
    prepare_workers: int = 0  # processes that decode images; 0 = all cores
    skip_bad_images: bool = False  # skip unreadable files instead of failing
    options: dict[str, Any] = field(default_factory=dict)  # reader-specific options

    def check(self, section: str = "data") -> None:
        _positive(section, self, "image_size")
        if self.channels not in (1, 3):
            raise ConfigError(f"config key '{section}.channels' must be 1 or 3, got {self.channels}")
        for key in ("mean", "std"):
            if len(getattr(self, key)) != self.channels:
                raise ConfigError(
                    f"config key '{section}.{key}' needs {self.channels} values (one per channel), "
                    f"got {len(getattr(self, key))}"
                )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"config key '{section}.std' must be positive")
        if self.prepare_workers < 0:
            raise ConfigError("worker counts (train.workers, data.prepare_workers) must be ≥ 0")
        in_range(section, self, "train_store_size", 0)
        in_range(section, self, "test_resize", 1)
        in_range(section, self, "mean", 0, 255)
        if self.resolved_test_resize < self.image_size:
            raise ConfigError(
                f"config key '{section}.test_resize' ({self.resolved_test_resize}) must be ≥ {section}.image_size "
                f"({self.image_size})"
            )

    @property
    def resolved_test_resize(self) -> int:
        return self.test_resize if self.test_resize is not None else int(self.image_size * 1.15)


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "conv4"  # a key of negmargin.backbones.BACKBONES
    head: Literal["cosine", "softmax"] = "cosine"
    # Rows of the training head. None = the number of base classes in the data (resolved
    # when training starts). The reference configs say 100 for miniImageNet although it
    # has 64 classes.
    num_classes: int | None = None
    margin: float = 0.0  # ≤ 0: the target logit is T·(s_y − m)
    temperature: float = 10.0
    # A positive margin is outside the Neg-Margin method (it is the usual
    # large-margin loss); allowed only for the margin study of bench/margin_study.py.
    allow_positive_margin: bool = False

    def check(self, section: str = "model") -> None:
        if self.margin > 0 and not self.allow_positive_margin:
            raise ConfigError(
                f"config key '{section}.margin' must be ≤ 0 for Neg-Margin, got {self.margin} "
                "(a positive margin is a different method; set model.allow_positive_margin=True "
                "to study it)"
            )
        if self.num_classes is not None and self.num_classes <= 0:
            raise ConfigError(f"config key '{section}.num_classes' must be positive or None")
        in_range(section, self, "margin", -1, 1)  # a cosine is in [-1, 1]: a larger margin is meaningless
        if self.temperature <= 0:
            raise ConfigError("temperatures (model.temperature, finetune.temperature) must be > 0")


@dataclass(frozen=True)
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

    def check(self, section: str = "augment") -> None:
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"config key '{section}.crop_scale' must satisfy 0 < lo ≤ hi ≤ 1, got {lo, hi}")
        lo, hi = self.crop_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"config key '{section}.crop_ratio' must satisfy 0 < lo ≤ hi, got {lo, hi}")
        in_range(section, self, "flip_prob", 0, 1)
        for name in ("brightness", "contrast", "saturation"):
            in_range(section, self, name, 0, 1)  # factors 1 ± U(0, value): beyond 1 a factor goes negative


@dataclass(frozen=True)
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
    device: str = "auto"  # auto | cpu | cuda | cuda:N (resolved at run start)
    # Mixed precision. "fp32" is the reference; "bf16" autocasts the backbone.
    # "auto" = bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 / AMX, or ARM's
    # BF16), fp32 elsewhere (resolved at run start; see negmargin.runtime).
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    # Channels-last: faster or equal for Conv4 and ResNet12 on CPUs in fp32 and bf16
    # (bench/train_speed.py), and the usual choice on GPUs. ("auto" in configs and
    # checkpoints written by earlier versions means "on".)
    channels_last: Literal["on", "off"] = "on"
    compile: bool = False  # torch.compile the backbone
    # CPU training: each block's batch norm fused with its activation, shortcut add and max
    # pooling in one C++ kernel (negmargin/fused_norm.py; built on first use, needs a C++
    # compiler). The same computation with other roundings, not the same bits: end to end
    # x1.42 for Conv4 bf16, x1.26 for ResNet12 (AMX Xeon; docs/benchmarks.md). Off: ATen's layers.
    fused_norm: bool = False
    # CPU runs: "retain" has glibc's malloc keep freed memory for reuse (no mmap of large
    # blocks, no trimming), so a step's tensors land on the pages the previous step freed
    # instead of fresh pages the kernel must zero (~470 MB per Conv4 step at batch 64):
    # x1.33 end to end for Conv4 on an AVX2 EPYC (bench/train_speed.py --before malloc).
    # Results are bit-identical; the process keeps its peak memory (CUB Conv4: 3.2 -> 4.6
    # GiB). "system": glibc's own thresholds. A no-op where the C library is not glibc.
    cpu_malloc: Literal["retain", "system"] = "retain"
    workers: int = 1  # background threads that cut the next batches' crops (0: inline)
    sync_bn: bool = False  # SyncBatchNorm under torchrun
    # Under torchrun: "none" keeps lr for the global batch (per-process batch =
    # batch_size / world size); "linear" multiplies lr by the world size and
    # keeps batch_size per process.
    ddp_scaling: Literal["none", "linear"] = "none"
    max_iters_per_epoch: int | None = None  # cut epochs short (smoke tests)

    def check(self, section: str = "train") -> None:
        _positive(section, self, "epochs", "batch_size", "log_interval", "checkpoint_interval")
        if self.lr <= 0:
            raise ConfigError("learning rates (train.lr, finetune.lr) must be > 0")
        if self.workers < 0:
            raise ConfigError("worker counts (train.workers, data.prepare_workers) must be ≥ 0")
        if self.fused_norm and self.compile:
            raise ConfigError(
                f"config keys '{section}.fused_norm' and '{section}.compile' do not combine "
                "(torch.compile cannot trace the fused kernel): set one of them to False"
            )
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"config key '{section}.milestones' must be increasing, got {self.milestones}")
        in_range(section, self, "milestones", 0)
        in_range(section, self, "lr", 0, open_lo=True)
        in_range(section, self, "momentum", 0, 1, open_hi=True)
        in_range(section, self, "weight_decay", 0)
        in_range(section, self, "gamma", 0, open_lo=True)
        in_range(section, self, "warmup_iters", 0)
        in_range(section, self, "warmup_ratio", 0, 1, open_lo=True)
        in_range(section, self, "seed", 0, 2**32 - 1)  # NumPy's seed range
        in_range(section, self, "max_iters_per_epoch", 1)


@dataclass(frozen=True)
class EvalConfig:
    """One meta-test setting: which episodes, and how many fine-tune steps."""

    n_way: int = 5
    n_shot: int = 1
    n_query: int = 15
    n_episodes: int = 2000
    episode_seed: int = 0  # draws the episodes; independent of the model seed
    # None = the protocol's rule: 150 for 5-way 1-shot, 600 for 5-way 5-shot (resolved at start)
    steps: int | None = None

    def check(self, section: str = "meta_test") -> None:
        _positive(section, self, "n_way", "n_shot", "n_query", "n_episodes", "steps")
        if self.n_way < 2:
            raise ConfigError(f"config key '{section}.n_way' must be at least 2")
        in_range(section, self, "episode_seed", 0, 2**32 - 1)

    @property
    def resolved_steps(self) -> int:
        return self.steps if self.steps is not None else default_finetune_steps(self.n_way * self.n_shot)


@dataclass(frozen=True)
class ValConfig(EvalConfig):
    n_episodes: int = 100
    interval: int = 5  # epochs

    def check(self, section: str = "val") -> None:
        super().check(section)
        _positive(section, self, "interval")


@dataclass(frozen=True)
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
        return _build(cls, _legacy(raw), "", source)

    def validate(self) -> Config:
        """Each section's range checks (written beside its fields), in this order."""
        self.train.check("train")
        self.val.check("val")
        self.meta_test.check("meta_test")
        self.data.check("data")
        self.finetune.check("finetune")
        self.model.check("model")
        self.augment.check("augment")
        return self

    @property
    def test_resize(self) -> int:
        return self.data.resolved_test_resize

    def resolved(self, device: str, precision: str, num_classes: int | None = None) -> Config:
        """This config with every "None/auto means derived" value made explicit.

        The one place derived values are resolved (called by
        :func:`negmargin.runtime.resolve`): ``data.test_resize``, ``val.steps``,
        ``meta_test.steps``, ``train.device``, ``train.precision`` and, when training,
        ``model.num_classes``. The dumped config and the checkpoint hold these values.
        """
        return replace(
            self,
            data=replace(self.data, test_resize=self.test_resize),
            val=replace(self.val, steps=self.val.resolved_steps),
            meta_test=replace(self.meta_test, steps=self.meta_test.resolved_steps),
            train=replace(self.train, device=device, precision=precision),  # type: ignore[arg-type]
            model=replace(self.model, num_classes=self.model.num_classes or num_classes),
        )


def _legacy(raw: dict[str, Any]) -> dict[str, Any]:
    """Configs stored by earlier versions: channels_last="auto" meant "on"."""
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and train.get("channels_last") == "auto":
        raw = {**raw, "train": {**train, "channels_last": "on"}}
    return raw


def default_finetune_steps(n_support: int) -> int:
    """Fine-tune steps for a support set of ``n_support`` images.

    The protocol fixes 150 steps for 5-way 1-shot (5 images) and 600 for 5-way
    5-shot (25 images); in between and beyond, 24 steps per support image,
    clipped to [150, 600]. ``predict`` uses the same rule for uneven shots.
    """
    return int(min(600, max(150, 24 * n_support)))


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a config file, apply ``key.sub=value`` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config '{path}' is a folder; give a config file, e.g. {path}/<name>.py")
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
        if any(k is None for k in node.keys):
            raise ConfigError(f"{path}:{node.lineno}: '**' is not allowed in a config dict")
        return {_literal(k, path): _literal(v, path) for k, v in zip(node.keys, node.values) if k is not None}
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
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
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


def _near_files(path: Path) -> str:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return ""
    names = [p.name for p in folder.iterdir() if p.suffix == ".py"]
    near = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return str(folder / near[0]) if near else ""


def dump_config(cfg: Config, path: Path, note: str = "") -> None:
    """Write the resolved config as a config file that loads back to the same run;
    ``note`` (e.g. the machine it resolved on) becomes a comment line."""
    from .fileio import atomic_write_text

    lines = [f"# Resolved config of run '{cfg.name}' (written by negmargin; loads as is).\n"]
    if note:
        lines.append(f"# {note}\n")
    for section, values in cfg.to_dict().items():
        lines.append(f"{section} = {pprint.pformat(values, sort_dicts=False, width=88)}\n")
    atomic_write_text(path, "".join(lines))
