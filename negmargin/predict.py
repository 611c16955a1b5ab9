"""Few-shot prediction on a user's own images.

    clf = FewShotClassifier.from_checkpoint("work_dir/.../best_accuracy_mean.pth")
    clf.fit(support_images, labels)        # paths, PIL images or tensors; any shots per class
    clf.predict(query_images)              # class names
    clf.predict_proba(query_images)        # (N, K) probabilities

Features come from the checkpoint's backbone with the test transform (resize the
short side, centre crop, normalise) through :func:`negmargin.features.embed`, under
the runtime (device, precision, memory format) that :func:`negmargin.runtime.resolve`
derives from the checkpoint's config — the meta-test's path; a fresh cosine head is
fine-tuned on the support set with the meta-test settings (``fit_heads``, one episode).
The user's files are found by :mod:`negmargin.imageio`; the command's output is the CLI's. Steps: the protocol's 150 for 5 support images and
600 for 25, and for other sizes 24 per support image clipped to [150, 600]
(:func:`negmargin.config.default_finetune_steps`). Uneven shots are fine.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint
from .config import Config, default_finetune_steps, load_config
from .errors import CheckpointError, ConfigError, DataError, UserError
from .features import embed
from .finetune import FittedHeads, fit_heads
from .imageio import ImageLike, Skipped, as_uint8, read_support_folder
from .model import load_trained_model
from .runtime import Runtime, resolve

UNKNOWN = "unknown"


# ------------------------------------------------------------------ one validation layer
# The CLI's argparse types and the Python API call the same checks, so a value is
# refused with the same words wherever it comes from (the CLI names the flag, the API
# the argument).


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1, or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def probability(name: str, value: Any) -> float:
    """``value`` as a float in (0, 1), or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise UserError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


class FewShotClassifier:
    """A trained backbone plus a cosine head fine-tuned on a support set."""

    def __init__(self, backbone: nn.Module, cfg: Config, runtime: Runtime) -> None:
        self.backbone = backbone.eval()
        self.cfg = cfg
        self.runtime = runtime
        self.classes: list = []  # the labels given to fit(), in their own type, first-seen order
        self._heads: FittedHeads | None = None

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", config: str | Path | None = None
    ) -> FewShotClassifier:
        """Load a negmargin checkpoint (its stored config, or ``config`` instead); reads the file once.

        The runtime (device, precision, memory format) is resolved from that config as
        ``test.py`` resolves it, so a checkpoint's features here equal the meta-test's.
        """
        ckpt = load_checkpoint(path)
        if config is not None:
            cfg = load_config(config)
        elif ckpt.get("config"):
            try:
                cfg = Config.from_dict(ckpt["config"], source=f"config stored in {path}").validate()
            except ConfigError as exc:
                raise CheckpointError(f"checkpoint '{path}' holds an unusable config: {exc}") from None
        else:
            raise CheckpointError(
                f"checkpoint '{path}' holds no config (an imported reference "
                "checkpoint?); pass --config with the matching config file"
            )
        cfg, rt = resolve(replace(cfg, train=replace(cfg.train, device=device)))
        model, _ = load_trained_model(cfg, path, rt.device, ckpt, channels_last=rt.channels_last)
        return cls(model.backbone, cfg, rt)

    # ------------------------------------------------------------------ features
    def embed_each(
        self,
        images: Sequence[ImageLike],
        batch_size: int | None = None,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> tuple[Tensor, list[int], Skipped]:
        """Features of the images that decode, the positions they came from, and what was skipped.

        The images go through :func:`negmargin.features.embed`, the path the meta-test
        uses. With ``skip_bad`` an image that cannot be decoded is left out and
        recorded; without it the first one raises a :class:`DataError` naming it.
        ``batch_size``: images per forward pass (default ``finetune.feature_batch_size``).

        Returns:
            (M, D) float32 on the CPU, the M positions in ``images``, the skipped files.
        """
        images = list(images)
        if batch_size is None:
            batch_size = self.cfg.finetune.feature_batch_size
        batch_size = positive_int("batch_size", batch_size)
        bad: dict[int, str] = {}  # written by the worker threads, one key each

        def view(i: int) -> np.ndarray | None:
            image = images[i]
            try:
                return as_uint8(image, self.cfg.data.channels, f"image {i}")
            except DataError as exc:
                if not skip_bad:
                    raise
                bad[i] = str(image) if isinstance(image, (str, Path)) else f"image {i}: {exc}"
                return None

        feats, kept = embed(self.backbone, len(images), view, self.cfg, self.runtime, batch_size, progress)
        skipped = Skipped()
        for i in sorted(bad):
            skipped.add("unreadable image(s)", bad[i])
        return feats.cpu(), kept, skipped

    def embed(
        self, images: Sequence[ImageLike], batch_size: int | None = None, progress: bool = False
    ) -> Tensor:
        """Backbone features of the images under the test transform: (N, D) float32, CPU."""
        return self.embed_each(list(images), batch_size, progress=progress)[0]

    # ------------------------------------------------------------------ support / query
    def fit(
        self, images: Sequence[ImageLike], labels: Sequence, steps: int | None = None
    ) -> FewShotClassifier:
        """Fine-tune a fresh head on labelled support images (≥ 2 classes, ≥ 1 image each).

        ``labels`` may be of any hashable type (strings, ints, ...); :meth:`predict`
        returns them as given.
        """
        images, labels = list(images), list(labels)
        if len(images) != len(labels):
            raise UserError(f"fit: {len(images)} images but {len(labels)} labels")
        for label in labels:
            if not isinstance(label, Hashable):
                raise UserError(f"fit: labels must be hashable (str, int, ...), got {type(label).__name__}")
        steps = default_finetune_steps(len(images)) if steps is None else positive_int("steps", steps)
        classes = list(dict.fromkeys(labels))
        if len(classes) < 2:
            raise UserError(f"few-shot prediction needs at least 2 classes in the support set, got {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[label] for label in labels])
        feats = self.embed(images)
        self._heads = fit_heads(feats[None], y[None], len(classes), [0], self.cfg.finetune, steps)
        self.classes = classes
        return self

    def fit_folder(
        self, folder: str | Path, steps: int | None = None, log: Callable[[str], None] | None = None
    ) -> FewShotClassifier:
        """Support set from ``folder/<class name>/<images>`` (sub-folders of a class included)."""
        support = read_support_folder(folder)
        self.fit(support.paths, support.labels, steps)
        if log is not None:  # after the fit: an error stays the only line
            log(support.line())
            if report := support.skipped.line("the support folder"):
                log(report)
        return self

    def proba_of(self, features: Tensor) -> Tensor:
        """(N, D) query features (from :meth:`embed`) → (N, K) softmax of T·cos over the fitted classes."""
        if self._heads is None:
            raise UserError("call fit() (or fit_folder()) with a support set before predicting")
        if features.numel() == 0:
            return torch.empty(0, len(self.classes))
        cos = self._heads.scores(features[None])[0]
        return torch.softmax(self.cfg.finetune.temperature * cos, dim=-1).float()

    def labels_of(
        self, proba: Tensor, unknown_below: float | None = None, unknown_label: Hashable = UNKNOWN
    ) -> list:
        """The fitted label of each row's best class; ``unknown_label`` where its probability < threshold."""
        if unknown_below is not None:
            unknown_below = probability("unknown_below", unknown_below)
        best_p, best = (
            proba.max(-1) if len(proba) else (proba.new_empty(0), proba.new_empty(0, dtype=torch.long))
        )
        return [
            unknown_label if unknown_below is not None and p < unknown_below else self.classes[i]
            for p, i in zip(best_p.tolist(), best.tolist())
        ]

    def predict_proba(self, images: Sequence[ImageLike]) -> Tensor:
        """(N, K) softmax of T·cos over the fitted classes (columns in :attr:`classes` order)."""
        if self._heads is None:
            raise UserError("call fit() (or fit_folder()) with a support set before predicting")
        return self.proba_of(self.embed(images))

    def predict(
        self,
        images: Sequence[ImageLike],
        unknown_below: float | None = None,
        unknown_label: Hashable = UNKNOWN,
    ) -> list:
        """The fitted label of each image (in the type given to :meth:`fit`).

        ``unknown_below``: an image whose best probability is below it gets
        ``unknown_label`` instead (open set: images of none of the support classes).
        To get labels and probabilities from one embedding, call :meth:`embed` once
        and then :meth:`proba_of` and :meth:`labels_of`.
        """
        return self.labels_of(self.predict_proba(images), unknown_below, unknown_label)

    def predict_rows(
        self,
        paths: Sequence[Path],
        top_k: int = 3,
        unknown_below: float | None = None,
        batch_size: int | None = None,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> tuple[list[dict], Skipped]:
        """One row per readable image (path, predicted, probability, top-k), embedding each image once."""
        top_k = positive_int("top_k", top_k)
        feats, kept, skipped = self.embed_each(list(paths), batch_size, skip_bad, progress)
        probs = self.proba_of(feats)
        labels = self.labels_of(probs, unknown_below)
        k = min(top_k, len(self.classes))
        top_p, top_i = probs.topk(k, dim=-1)
        rows = []
        for pos, label, ps, ids in zip(kept, labels, top_p.tolist(), top_i.tolist()):
            rows.append(
                {
                    "path": str(paths[pos]),
                    "predicted": label,
                    "probability": round(ps[0], 6),
                    "top_k": [
                        {"class": self.classes[i], "probability": round(p, 6)} for p, i in zip(ps, ids)
                    ],
                }
            )
        return rows, skipped
