"""Reference implementations the fast paths are checked and timed against.

:func:`reference_episode` is the plain one-episode fine-tune, as the reference
implementation runs each episode: used by tests/test_finetune.py (exactness),
bench/metatest.py (the timing baseline) and bench/gpu_check.py, so all measure
against the same code. It lives in the package (not under tests/) so that benches
may import it without the test tree; no pytest import.
"""

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
