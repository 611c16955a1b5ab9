"""The Neg-Margin classification head (its margin sign convention is pinned by tests/test_models.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError


class NegMarginHead(nn.Module):
    """Cosine (or softmax) classifier with an additive margin on the target class.

    Scores ``s`` of shape (B, C):

    * ``cosine``: ``s_j = <x/‖x‖, w_j/‖w_j‖>``;
    * ``softmax``: ``s = W x``, then ``s -= min_j s_j`` per row.

    With labels (training), the target entry becomes ``s_y − m``; the logits are
    ``T·s``. So the target logit is exactly ``T·(s_y − m)`` and the others ``T·s_j``.
    Neg-Margin uses ``m ≤ 0``: a negative margin *raises* the target logit, which
    makes base classes less separated and, per the paper, novel classes easier.
    Without labels (queries) there is no margin: logits = ``T·s``.

    Args:
        in_features: D, the backbone's feature size.
        num_classes: C, rows of the weight ``(C, D)``.
        metric: "cosine" or "softmax".
        margin: m; must be ≤ 0 unless ``allow_positive_margin``.
        temperature: T.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        metric: str = "cosine",
        margin: float = 0.0,
        temperature: float = 10.0,
        allow_positive_margin: bool = False,
    ) -> None:
        super().__init__()
        if metric not in ("cosine", "softmax"):
            raise ConfigError(f"head metric must be 'cosine' or 'softmax', got '{metric}'")
        if margin > 0 and not allow_positive_margin:
            raise ConfigError(f"Neg-Margin needs margin ≤ 0, got {margin}")
        self.metric = metric
        self.margin = float(margin)
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # uniform(±1/√D)

    def similarity(self, x: Tensor) -> Tensor:
        """(B, D) features → (B, C) scores before margin and temperature."""
        w = self.weight
        if self.metric == "cosine":
            return F.linear(F.normalize(x, dim=1), F.normalize(w, dim=1))
        s = F.linear(x, w)
        return s - s.min(dim=1, keepdim=True).values

    def logits(self, s: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, C) scores [, (B,) labels] → T·(s − m·onehot(labels)), or T·s without labels."""
        if labels is not None and self.margin != 0.0:
            s = s - self.margin * F.one_hot(labels, s.shape[1]).to(s.dtype)
        return self.temperature * s

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """(B, D) features [, (B,) labels] → (B, C) logits."""
        return self.logits(self.similarity(x), labels)
