"""The meta-test engine: draw episodes over a split's features, fine-tune, score.

The features come from :mod:`negmargin.features`. One engine serves validation during training (100 val episodes) and ``test.py``
(2000 episodes). :func:`run_episodes` is a pure function of (features, episodes,
episode ids, settings): each episode's random head init and batch order depend
only on its id, so the episodes can be split across chunks or processes and give
the same per-episode accuracies.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import distributed as dist
from .config import EvalConfig
from .episodes import sample_episodes
from .finetune import EPS, FinetuneConfig, cpu_workers, fit_heads, intra_op_threads
from .runlog import progress_bar

Z_95 = 1.96
CHUNKS_PER_WORKER = 4  # chunks per core: balance when a core is shared with other work
CHUNKS_MIN = 64  # episodes per chunk at least: smaller chunks pay Python's per-op cost


@dataclass(frozen=True)
class MetaTestResult:
    accuracies: np.ndarray  # (n_episodes,) percent
    n_way: int
    n_shot: int
    n_query: int
    steps: int
    extra: dict = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        """95% confidence half-width: 1.96 · std(ddof=0) / √episodes (the reference's formula)."""
        return float(Z_95 * self.accuracies.std() / math.sqrt(len(self.accuracies)))

    def to_dict(self, with_episodes: bool = False) -> dict:
        out = {
            "accuracy_mean": round(self.mean, 4),
            "accuracy_ci95": round(self.ci95, 4),
            "n_episodes": len(self.accuracies),
            "n_way": self.n_way,
            "n_shot": self.n_shot,
            "n_query": self.n_query,
            "steps": self.steps,
            **self.extra,
        }
        if with_episodes:
            out["episode_accuracies"] = [round(float(a), 4) for a in self.accuracies]
        return out

    def line(self) -> str:
        return (
            f"{self.n_way}-way {self.n_shot}-shot: accuracy_mean {self.mean:.2f}  "
            f"95% CI ± {self.ci95:.2f}  ({len(self.accuracies)} episodes)"
        )


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of ``a - b`` and its 95% CI half-width, for two scores of the *same* items.

    Two models meta-tested on the same episodes (the engine's episodes depend only
    on ``episode_seed``), or top-1 hits (0/100) on the same images: the difference
    per item cancels what the items share (an easy episode is easy for both), so its
    CI is usually far tighter than the two separate CIs — it separates a real
    difference between the models from the draw of episodes. It says nothing about
    training noise (another seed gives another model).

    Args:
        a, b: (n,) per-item scores, item i the same episode or image in both.
    Returns:
        (mean difference, 1.96 · std(a - b) / √n) — the same formula as
        :attr:`MetaTestResult.ci95`, applied to the differences.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(
            f"paired_difference needs two 1-d score arrays over the same items, got shapes "
            f"{a.shape} and {b.shape}"
        )
    d = a - b
    return float(d.mean()), float(Z_95 * d.std() / math.sqrt(len(d)))


def auto_chunk(n_support: int, n_query: int, n_way: int, dim: int, budget_bytes: int = 256 * 2**20) -> int:
    """Episodes per chunk so that the gathered features of a chunk stay within the budget."""
    per_episode = (n_support + n_query + n_way) * dim * 4 * 3  # features, normalised copies
    return max(16, min(1024, budget_bytes // per_episode))


def run_episodes(
    features: Tensor,
    episodes: Tensor,
    episode_ids: Tensor,
    n_shot: int,
    settings: FinetuneConfig,
    steps: int,
    progress: bool = False,
    desc: str = "meta-test",
) -> np.ndarray:
    """Fine-tune and score every episode.

    Parallelism on a CPU: every op of the per-episode algebra runs on one core, and
    the cores fine-tune different chunks of episodes at the same time (torch releases
    the GIL inside its kernels). The ops work on matrices of a few dozen rows, so
    splitting each over all cores costs more in synchronisation than it gains, and
    on a busy machine every split op waits for the slowest core; whole chunks per
    core degrade gracefully instead (measured in bench/metatest.py, idle and loaded).
    The chunks are several per core, so a core slowed by another process takes fewer.

    Args:
        features: (N, D) features of the split (any device).
        episodes: (E, n_way, n_shot + n_query) indices into ``features``.
        episode_ids: (E,) global ids, seeding each episode's head init and batch order.
        settings: the fine-tune; its ``chunk_size`` (episodes per chunk, 0 = chosen
            from memory and cores) and ``threads`` (chunks at once, 0 = :func:`negmargin.finetune.cpu_workers`'
            choice) only decide how the work is split.
        steps: SGD steps per episode.

    Returns:
        (E,) accuracy in percent over each episode's queries (independent of
        ``chunk_size`` and ``threads``: each episode's numbers depend only on its id).
    """
    E, n_way, per_class = episodes.shape
    n_query = per_class - n_shot
    n = n_way * n_shot
    device = features.device
    dim = features.shape[1]
    workers = cpu_workers(device, settings.threads)
    chunk = settings.chunk_size or min(
        auto_chunk(n, n_way * n_query, n_way, dim),
        max(CHUNKS_MIN, math.ceil(E / (CHUNKS_PER_WORKER * workers))),
    )
    # Unit rows once for the whole split: each episode's gathered copies need no second pass.
    normed = F.normalize(features.float(), dim=-1, eps=EPS)
    support_labels = torch.arange(n_way, device=device).repeat_interleave(n_shot)
    query_labels = torch.arange(n_way, device=device).repeat_interleave(n_query)
    out = np.empty(E, dtype=np.float64)
    bar = progress_bar(total=E, desc=desc, unit="episode", enabled=progress, leave=False)

    def one_chunk(start: int) -> None:
        stop = min(start + chunk, E)
        ep = episodes[start:stop].to(device)
        m = stop - start
        support = normed[ep[:, :, :n_shot].reshape(m, n)]
        query_index = ep[:, :, n_shot:].reshape(m, n_way * n_query)
        heads = fit_heads(
            support,
            support_labels.expand(m, n),
            n_way,
            episode_ids[start:stop],
            settings,
            steps,
            normalized=True,
        )
        pred = heads.scores_from(normed, query_index).argmax(-1)
        out[start:stop] = (pred == query_labels).double().mean(-1).mul(100).cpu().numpy()
        bar.update(m)

    starts = range(0, E, chunk)
    if workers == 1 or len(starts) == 1:
        for start in starts:
            one_chunk(start)
    else:
        with intra_op_threads(1), cf.ThreadPoolExecutor(workers) as pool:
            list(pool.map(one_chunk, starts))  # list(): re-raise a chunk's exception here
    bar.close()
    return out


def meta_test_episodes(
    features: Tensor,
    episodes: Tensor,
    episodes_cfg: EvalConfig,
    finetune_cfg: FinetuneConfig,
    progress: bool = True,
    desc: str = "meta-test",
) -> MetaTestResult:
    """Meta-test given episodes; under torchrun each rank runs a strided share and the
    per-episode accuracies are gathered, so every rank returns the single-process result."""
    steps = episodes_cfg.resolved_steps
    ids = torch.arange(len(episodes))
    rank, world = dist.rank(), dist.world_size()
    mine = ids[rank::world]
    accs = run_episodes(
        features,
        episodes[mine],
        mine,
        episodes_cfg.n_shot,
        finetune_cfg,
        steps,
        progress=progress and rank == 0,
        desc=desc,
    )
    if world > 1:
        full = np.empty(len(episodes), dtype=np.float64)
        for part_ids, part in dist.all_gather_object((mine.numpy(), accs)):
            full[part_ids] = part
        accs = full
    return MetaTestResult(accs, episodes_cfg.n_way, episodes_cfg.n_shot, episodes_cfg.n_query, steps)


def run_meta_test(
    features: Tensor,
    labels: np.ndarray,
    episodes_cfg: EvalConfig,
    finetune_cfg: FinetuneConfig,
    class_names: list[str] | None = None,
    where: str = "split",
    progress: bool = True,
    desc: str = "meta-test",
) -> MetaTestResult:
    """Draw ``episodes_cfg``'s episodes from a split and meta-test them."""
    episodes = sample_episodes(
        labels,
        episodes_cfg.n_way,
        episodes_cfg.n_shot,
        episodes_cfg.n_query,
        episodes_cfg.n_episodes,
        seed=episodes_cfg.episode_seed,
        class_names=class_names,
        where=where,
    )
    return meta_test_episodes(features, episodes, episodes_cfg, finetune_cfg, progress, desc)
