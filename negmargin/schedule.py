"""The reference learning-rate schedule (mmcv ``step`` policy with linear warm-up).

``regular(epoch) = lr · gamma^(number of milestones ≤ epoch)`` (epochs 0-based), and
during the first ``warmup_iters`` iterations (global, 0-based)
``lr(it) = regular · (1 − k)`` with ``k = (1 − it / warmup_iters) · (1 − warmup_ratio)``,
so the first iteration runs at ``warmup_ratio · lr`` and iteration ``warmup_iters`` at
the regular rate.
"""

from __future__ import annotations

from .config import TrainConfig


def lr_at(cfg: TrainConfig, iteration: int, epoch: int, lr: float | None = None) -> float:
    """Learning rate for global ``iteration`` inside ``epoch`` (both 0-based)."""
    base = cfg.lr if lr is None else lr
    regular = base * cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    if iteration < cfg.warmup_iters:
        k = (1 - iteration / cfg.warmup_iters) * (1 - cfg.warmup_ratio)
        return regular * (1 - k)
    return regular
