"""The model: a backbone joined to the Neg-Margin head; building it, and loading it from a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .backbones import Backbone, build_backbone
from .checkpoint import load_checkpoint, load_model_weights
from .head import NegMarginHead

if TYPE_CHECKING:
    from .config import Config


class FewShotModel(nn.Module):
    """Backbone + training head.

    ``forward(images, labels)`` → ``(logits, sims)``: logits (B, C) with the margin
    on each image's label (the training loss's input) and the similarities (B, C)
    before margin and temperature. The head always runs in fp32: under autocast only
    the backbone is in reduced precision. For features alone call ``model.backbone``.
    """

    def __init__(self, backbone: Backbone, head: NegMarginHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(self, images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
        feats = self.backbone(images)
        with torch.autocast(images.device.type, enabled=False):
            sims = self.head.similarity(feats.float())
            return self.head.logits(sims, labels), sims


def build_model(cfg: Config, num_classes: int) -> FewShotModel:
    """Backbone and head from a config: ``num_classes`` rows of the training head."""
    backbone = build_backbone(cfg.model.backbone, cfg.data.channels, cfg.data.image_size)
    head = NegMarginHead(
        backbone.num_features,
        num_classes,
        metric=cfg.model.head,
        margin=cfg.model.margin,
        temperature=cfg.model.temperature,
        allow_positive_margin=cfg.model.allow_positive_margin,
    )
    return FewShotModel(backbone, head)


def load_trained_model(
    cfg: Config,
    checkpoint_path: str | Path,
    device: torch.device,
    ckpt: dict[str, Any] | None = None,
    *,
    channels_last: bool,
) -> tuple[FewShotModel, dict[str, Any]]:
    """The model of ``cfg`` with the checkpoint's weights, in eval mode, on ``device``.

    ``ckpt``: the checkpoint if already loaded (so a caller reads the file once).
    ``channels_last``: the memory format, as the caller's ``Runtime`` resolved it.
    """
    ckpt = load_checkpoint(checkpoint_path) if ckpt is None else ckpt
    model = build_model(cfg, int(ckpt["model"]["head.weight"].shape[0]))
    load_model_weights(model, ckpt, checkpoint_path, cfg.model.backbone)
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model, ckpt
