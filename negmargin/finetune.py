"""Per-episode fine-tuning of a fresh cosine head, batched over many episodes.

The reference fine-tunes, for every episode, a head ``W`` (K × D) initialised
kaiming_uniform(a=√5) with SGD (momentum, dampening, weight decay) on mini-batches
of the support set, then predicts the queries with ``argmax_j T·cos(q, w_j)``.

Every quantity that update touches is a linear combination of row j's *initial*
weights ``w0_j`` and the episode's normalised support features ``x̂_1..x̂_n``:
the cosine gradient is ``(T/b)·Σ_i r_ij (x̂_i − cos_ij ŵ_j)/‖w_j‖``, weight decay
adds ``λ w_j``, momentum mixes past gradients. So we keep each row as
``w_j = c_j w0_j + Σ_i A_ji x̂_i`` and run SGD on the n + 1 coefficients with

    ⟨w_j, x̂_i⟩ = c_j P_ji + (A G)_ji,        G = X̂ X̂ᵀ (n × n),  P = W0 X̂ᵀ (K × n)
    ‖w_j‖²     = c_j² ‖w0_j‖² + 2 c_j (A Pᵀ)_jj + (A G Aᵀ)_jj.

This is the same SGD, exactly (up to rounding), in a basis of size n + 1 instead
of D: the D-dimensional work is a few Gram matrices per episode, computed once,
and each step is a handful of tiny batched matrix products over all episodes at
once. ``tests/test_finetune.py`` checks it against a plain ``nn.Module`` +
``torch.optim.SGD`` loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError

EPS = 1e-12  # F.normalize's eps


@dataclass(frozen=True)
class FinetuneConfig:
    """The per-episode head fine-tune of the meta-test (reference values); the config's
    ``finetune`` section. The number of steps is not here: it belongs to the episode
    setting (``val.steps`` / ``meta_test.steps``) and is passed explicitly."""

    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.9
    weight_decay: float = 1e-3
    batch_size: int = 4
    temperature: float = 5.0
    seed: int = 0  # head init and support shuffling
    # Execution knobs, not hyperparameters: speed and memory, not the method. chunk_size and
    # threads change no number (an episode's result depends only on its id; tests/test_finetune.py
    # checks it); feature_batch_size can move the features by float rounding only.
    chunk_size: int = 0  # episodes fine-tuned at once; 0 = chosen from memory and cores
    threads: int = 0  # chunks fine-tuned at once on a CPU, one core each; 0 = all of torch's threads
    feature_batch_size: int = 128  # images per forward pass when extracting

    def check(self, section: str = "finetune") -> None:
        for key in ("batch_size", "feature_batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(
                    f"config key '{section}.{key}' must be a positive integer, got {getattr(self, key)}"
                )
        for key in ("chunk_size", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(
                    f"config key '{section}.{key}' must be 0 (automatic) or a positive integer, "
                    f"got {getattr(self, key)}"
                )
        if self.temperature <= 0:
            raise ConfigError("temperatures (model.temperature, finetune.temperature) must be > 0")
        if self.lr <= 0:
            raise ConfigError("learning rates (train.lr, finetune.lr) must be > 0")
        for name, lo, hi, open_hi in (("momentum", 0, 1, True), ("dampening", 0, 1, False),
                                      ("weight_decay", 0, math.inf, False), ("seed", 0, 2**32 - 1, False)):  # fmt: skip
            value = getattr(self, name)
            if not (lo <= value and (value < hi if open_hi else value <= hi)):
                raise ConfigError(
                    f"config key '{section}.{name}' must be in [{lo}, {hi:g}{')' if open_hi else ']'}, got {value!r}"
                )


def episode_randomness(
    episode_ids: Tensor | np.ndarray | list[int],
    n_way: int,
    dim: int,
    n_support: int,
    settings: FinetuneConfig,
    steps: int,
) -> tuple[Tensor, Tensor]:
    """Initial head weights and support batch orders, a pure function of the episode id.

    Episode e uses the generator ``PCG64([seed, e])``, so any split of the episodes
    into chunks or processes gives the same numbers.

    Returns:
        init: (E, n_way, dim) float32, uniform(±1/√dim) (= kaiming_uniform(a=√5));
        orders: (E, passes, n_support) int64, one shuffled pass over the support
        set per row, as many passes as the steps need.
    """
    per_pass = math.ceil(n_support / settings.batch_size)
    passes = math.ceil(steps / per_pass)
    bound = 1.0 / math.sqrt(dim)
    ids = np.asarray(episode_ids, dtype=np.int64)
    init = np.empty((len(ids), n_way, dim), dtype=np.float32)
    orders = np.empty((len(ids), passes, n_support), dtype=np.int64)
    base = np.tile(np.arange(n_support), (passes, 1))
    for k, e in enumerate(ids):
        rng = np.random.default_rng([settings.seed, int(e)])
        init[k] = rng.uniform(-bound, bound, (n_way, dim))
        orders[k] = rng.permuted(base, axis=1)
    return torch.from_numpy(init), torch.from_numpy(orders)


def step_positions(orders: Tensor, step: int, batch_size: int) -> Tensor:
    """Support positions of ``step``'s mini-batch: (E, b), last batch of a pass may be short."""
    n = orders.shape[-1]
    per_pass = math.ceil(n / batch_size)
    p, k = divmod(step, per_pass)
    return orders[:, p, k * batch_size : min((k + 1) * batch_size, n)]


@dataclass(frozen=True)
class Grams:
    """The per-episode inner products the fine-tune and the prediction need."""

    G: Tensor  # (E, n, n)  X̂ X̂ᵀ
    P: Tensor  # (E, K, n)  W0 X̂ᵀ
    w0sq: Tensor  # (E, K)  ‖w0_j‖²
    QW: Tensor | None = None  # (E, q, K)  Q̂ W0ᵀ
    QX: Tensor | None = None  # (E, q, n)  Q̂ X̂ᵀ


def compute_grams(
    support: Tensor, init: Tensor, query: Tensor | None = None, normalized: bool = False
) -> Grams:
    """(E, n, D) support, (E, K, D) initial heads, (E, q, D) queries → :class:`Grams` (float64).

    ``normalized``: support and query rows are unit vectors already (the meta-test
    normalises a split's features once, before gathering each episode's rows: the
    same per-row operation, without a pass over the gathered copies).
    """
    xs = support if normalized else F.normalize(support, dim=-1, eps=EPS)
    QW, QX = (None, None) if query is None else query_grams(query, init, xs, normalized)
    return Grams(
        G=(xs @ xs.transpose(1, 2)).double(),
        P=(init @ xs.transpose(1, 2)).double(),
        w0sq=init.double().pow(2).sum(-1),
        QW=QW,
        QX=QX,
    )


def query_grams(query: Tensor, init: Tensor, xs: Tensor, normalized: bool = False) -> tuple[Tensor, Tensor]:
    """QW = Q̂ W0ᵀ (E, q, K) and QX = Q̂ X̂ᵀ (E, q, n), float64, for (E, q, D) queries and unit
    support rows ``xs`` (E, n, D); ``normalized``: the queries are unit rows already."""
    qs = query if normalized else F.normalize(query, dim=-1, eps=EPS)
    return (qs @ init.transpose(1, 2)).double(), (qs @ xs.transpose(1, 2)).double()


QUERY_BLOCK = 32  # episodes whose query rows are gathered at once (~15 MB at 75 × 1600-d: cache-sized)


def query_products(table: Tensor, index: Tensor, init: Tensor, xs: Tensor) -> tuple[Tensor, Tensor]:
    """QW = Q̂ W0ᵀ and QX = Q̂ X̂ᵀ (float64) for query rows ``table[index]``, block by block.

    ``table``: (N, D) unit rows of a split; ``index``: (E, q); ``init``: (E, K, D);
    ``xs``: (E, n, D) unit support rows. The same products as gathering all (E, q, D)
    query rows first, without writing that copy out to memory and reading it back:
    for 2000 episodes × 75 queries × 1600-d it is 1 GB, the engine's largest cost.
    """
    QW, QX = [], []
    for start in range(0, len(index), QUERY_BLOCK):
        qs = table[index[start : start + QUERY_BLOCK]]
        QW.append((qs @ init[start : start + QUERY_BLOCK].transpose(1, 2)).double())
        QX.append((qs @ xs[start : start + QUERY_BLOCK].transpose(1, 2)).double())
    return torch.cat(QW), torch.cat(QX)


@dataclass
class HeadState:
    """Fine-tuned heads in the small basis: ``W = c·W0 + A·X̂``."""

    c: Tensor  # (E, K)
    A: Tensor  # (E, K, n)
    norm: Tensor  # (E, K) ‖w_j‖ after the last step

    def weights(self, support: Tensor, init: Tensor) -> Tensor:
        """The D-dimensional weights (E, K, D), for checks against the reference."""
        xs = F.normalize(support, dim=-1, eps=EPS).double()
        return self.c[..., None] * init.double() + self.A @ xs


def _norms(c: Tensor, A: Tensor, AG: Tensor, g: Grams) -> Tensor:
    sq = c * c * g.w0sq + 2 * c * (A * g.P).sum(-1) + (A * AG).sum(-1)
    return sq.clamp_min(0).sqrt().clamp_min(EPS)


def finetune(
    grams: Grams, support_labels: Tensor, orders: Tensor, settings: FinetuneConfig, steps: int
) -> HeadState:
    """Run ``steps`` SGD steps of the cosine head for every episode at once.

    Args:
        grams: from :func:`compute_grams`.
        support_labels: (E, n) int64 class of each support item (0..K-1).
        orders: (E, passes, n) support positions in batch order.

    Returns:
        the heads as a :class:`HeadState`.
    """
    E, K, n = grams.P.shape
    dtype, device = grams.P.dtype, grams.P.device
    s = settings
    T = s.temperature
    c = torch.ones(E, K, dtype=dtype, device=device)
    A = torch.zeros(E, K, n, dtype=dtype, device=device)
    mc = torch.zeros_like(c)
    mA = torch.zeros_like(A)
    onehot = F.one_hot(support_labels, K).to(dtype).transpose(1, 2)  # (E, K, n)
    orders = orders.to(device)
    for t in range(steps):
        pos = step_positions(orders, t, s.batch_size)  # (E, b)
        b = pos.shape[1]
        idx = pos[:, None, :].expand(E, K, b)
        AG = A @ grams.G  # (E, K, n)
        dots = c[..., None] * grams.P + AG  # ⟨w_j, x̂_i⟩
        norm = _norms(c, A, AG, grams)
        cos = dots.gather(2, idx) / norm[..., None]  # (E, K, b)
        prob = torch.softmax(T * cos, dim=1)
        r = prob - onehot.gather(2, idx)  # ∂loss/∂logit · b
        alpha = -(T / b) * (r * cos).sum(-1) / (norm * norm)  # coefficient of w_j itself
        scale = alpha + s.weight_decay
        gc = scale * c
        gA = scale[..., None] * A
        gA.scatter_add_(2, idx, (T / b) * r / norm[..., None])
        if t == 0:
            mc, mA = gc, gA
        else:
            mc = s.momentum * mc + (1 - s.dampening) * gc
            mA = s.momentum * mA + (1 - s.dampening) * gA
        c = c - s.lr * mc
        A = A - s.lr * mA
    return HeadState(c, A, _norms(c, A, A @ grams.G, grams))


def query_scores(grams: Grams, head: HeadState) -> Tensor:
    """Cosine of each query with each fine-tuned row: (E, q, K) (× T gives the logits)."""
    if grams.QW is None or grams.QX is None:
        raise ValueError("query_scores needs Grams computed with the queries")  # a caller's bug
    dots = head.c[:, None, :] * grams.QW + grams.QX @ head.A.transpose(1, 2)
    return dots / head.norm[:, None, :]


@contextlib.contextmanager
def intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops on ``n`` threads inside the block, then restore the setting.

    The setting is process-wide: inside a block that already set ``n`` (e.g. the
    meta-test's worker threads) this changes nothing, so nested uses do not race.
    """
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cpu_workers(device: torch.device, threads: int = 0) -> int:
    """How many threads take whole pieces of work at once (chunks of episodes, batches of images).

    ``threads`` if given (``finetune.threads``), else: on a GPU one (the device parallelises
    each op itself), on a CPU one per core torch may use, each running its ops on one core
    (see :func:`negmargin.meta_test.run_episodes` for the measurements behind it).
    """
    if threads:
        return threads
    return 1 if device.type != "cpu" else max(1, torch.get_num_threads())


def one_core(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """The fine-tune's many tiny batched ops run on one core each on a CPU (see
    :func:`negmargin.meta_test.run_episodes` for the measurements); a GPU parallelises them itself."""
    return intra_op_threads(1) if device.type == "cpu" else contextlib.nullcontext()


@dataclass
class FittedHeads:
    """Heads fine-tuned on E episodes' support sets, ready to score queries."""

    support: Tensor  # (E, n, D) support features
    init: Tensor  # (E, K, D) initial head rows
    grams: Grams
    head: HeadState
    normalized: bool = False  # support (and queries given to scores) are unit rows

    def scores(self, query: Tensor) -> Tensor:
        """(E, q, D) query features → (E, q, K) cosines with the fine-tuned rows (× T gives the logits)."""
        xs = self.support if self.normalized else F.normalize(self.support, dim=-1, eps=EPS)
        QW, QX = query_grams(query.float(), self.init, xs, self.normalized)
        return query_scores(replace(self.grams, QW=QW, QX=QX), self.head)  # support Grams kept

    def scores_from(self, table: Tensor, index: Tensor) -> Tensor:
        """Like :meth:`scores` for the queries ``table[index]``: ``table`` (N, D) unit rows (a
        split's features, normalised once), ``index`` (E, q). The query rows are never gathered
        into one (E, q, D) copy (:func:`query_products`)."""
        if not self.normalized:
            raise ValueError("scores_from needs heads fitted on normalised support rows")  # a caller's bug
        with one_core(table.device):
            QW, QX = query_products(table, index, self.init, self.support)
            return query_scores(replace(self.grams, QW=QW, QX=QX), self.head)


def fit_heads(
    support: Tensor,
    support_labels: Tensor,
    n_way: int,
    episode_ids: Tensor | np.ndarray | list[int],
    settings: FinetuneConfig,
    steps: int,
    normalized: bool = False,
) -> FittedHeads:
    """Fine-tune a fresh ``n_way``-row cosine head per episode: the one call the meta-test
    and :class:`negmargin.predict.FewShotClassifier` share; score queries with the result's
    :meth:`FittedHeads.scores` or :meth:`FittedHeads.scores_from`.

    Args:
        support: (E, n, D) support features; support_labels: (E, n) in 0..n_way-1.
        episode_ids: (E,) ids that seed each episode's head init and batch order.
        normalized: the support rows (and the queries scored later) are unit vectors already.
    """
    E, n, dim = support.shape
    init, orders = episode_randomness(episode_ids, n_way, dim, n, settings, steps)
    init = init.to(support.device)
    support = support.float()
    with one_core(support.device):
        grams = compute_grams(support, init, None, normalized)
        head = finetune(grams, support_labels, orders, settings, steps)
    return FittedHeads(support, init, grams, head, normalized)
