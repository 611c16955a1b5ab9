"""Few-shot episodes as index tensors.

An episode draws ``n_way`` classes of a split and, for each, ``n_shot + n_query``
distinct images; the first ``n_shot`` are the support set, the rest queries. All
episodes of a run come from one dedicated generator seeded with the episode
seed (NumPy's PCG64, whose stream is fixed across machines), independent of
the model seed, so every run and machine sees the same episodes.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import DataError


def check_episode_feasible(
    labels: np.ndarray, class_names: list[str] | None, n_way: int, n_per_class: int, where: str = "split"
) -> None:
    """Fail before drawing if the split has too few classes or too few images in a class."""
    counts = np.bincount(np.asarray(labels), minlength=len(class_names or []))
    present = int((counts > 0).sum())
    if n_way > present:
        raise DataError(
            f"n_way={n_way} but the {where} has only {present} classes; lower n_way "
            "(--cfg-options meta_test.n_way=... / val.n_way=...)"
        )
    small = np.flatnonzero((counts > 0) & (counts < n_per_class))
    if len(small):
        names = [class_names[i] if class_names else str(i) for i in small[:10]]
        raise DataError(
            f"{len(small)} class(es) of the {where} have fewer than n_shot + n_query = {n_per_class} "
            f"images: {', '.join(f'{n} ({counts[i]})' for n, i in zip(names, small[:10]))}; "
            "lower n_shot/n_query or remove those classes"
        )


def sample_episodes(
    labels: np.ndarray,
    n_way: int,
    n_shot: int,
    n_query: int,
    n_episodes: int,
    seed: int = 0,
    class_names: list[str] | None = None,
    where: str = "split",
) -> torch.Tensor:
    """Draw episodes.

    Args:
        labels: (n,) class index of each image of the split.

    Returns:
        (n_episodes, n_way, n_shot + n_query) int64 image indices; way w of an
        episode has episode label w; ``[..., :n_shot]`` is the support set.
    """
    labels = np.asarray(labels)
    per_class = n_shot + n_query
    check_episode_feasible(labels, class_names, n_way, per_class, where)
    classes = np.flatnonzero(np.bincount(labels) > 0)
    members = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    rng = np.random.default_rng(seed)
    out = np.empty((n_episodes, n_way, per_class), dtype=np.int64)
    for e in range(n_episodes):
        chosen = rng.permutation(classes)[:n_way]
        for w, c in enumerate(chosen):
            out[e, w] = rng.choice(members[c], per_class, replace=False)
    return torch.from_numpy(out)
