"""Reference implementations the fast paths are checked and timed against, and tiny configs.

:func:`reference_episode` is the plain one-episode fine-tune, as the reference
implementation runs each episode: used by tests/test_finetune.py (exactness),
bench/metatest.py (the timing baseline) and bench/gpu_check.py, so all measure
against the same code. :func:`tiny_raw` is the tiny generated-data run the tests and
``bench/gpu_check.py --smoke`` share. It lives in the package (not under tests/) so
that benches may import it without the test tree; no pytest import.
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .finetune import FinetuneConfig


class CosineHead(nn.Module):
    def __init__(self, weight: torch.Tensor, temperature: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.temperature = temperature

    def forward(self, x):
        return self.temperature * F.linear(F.normalize(x), F.normalize(self.weight))


def reference_episode(support, labels, query, init, order, s: FinetuneConfig, steps: int):
    """One episode the simple way: nn.Module head, torch.optim.SGD, mini-batches of 4."""
    head = CosineHead(init, s.temperature)
    opt = torch.optim.SGD(
        head.parameters(), lr=s.lr, momentum=s.momentum, dampening=s.dampening, weight_decay=s.weight_decay
    )
    n = len(support)
    per_pass = -(-n // s.batch_size)
    for t in range(steps):
        p, k = divmod(t, per_pass)
        pos = order[p, k * s.batch_size : (k + 1) * s.batch_size]
        loss = F.cross_entropy(head(support[pos]), labels[pos])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return head.weight.detach(), head(query).argmax(1)


def tiny_raw(root: Path, cache: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A tiny run's raw config: Conv4 at 32×32 on a folder dataset, 2 short epochs, small episodes.

    ``sections`` update the given sections, e.g. ``train={"epochs": 3}``.
    """
    raw: dict[str, Any] = {
        "name": "tiny",
        "data": {
            "dataset": "folder",
            "root": str(root),
            "image_size": 32,
            "train_store_size": 0,
            "cache_dir": str(cache),
            "prepare_workers": 1,
        },
        "model": {"backbone": "conv4", "margin": -0.01},
        "augment": {"crop_scale": (0.25, 1.0)},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "warmup_iters": 5,
            "milestones": [1],
            "log_interval": 5,
            "workers": 0,
            "checkpoint_interval": 1,
        },
        "val": {"interval": 1, "n_query": 5, "n_episodes": 10},
        "meta_test": {"n_query": 5, "n_episodes": 20},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


def write_config(path: Path, raw: dict) -> Path:
    """A config file (literal assignments) from a raw dict."""
    lines = [f"{k} = {v!r}\n" for k, v in raw.items()]
    path.write_text("".join(lines))
    return path
