"""Few-shot prediction on a user's own images: the classifier.

    clf = FewShotClassifier.from_checkpoint("work_dir/.../best_accuracy_mean.pth")
    clf = FewShotClassifier.from_pretrained("imagenet-effnet-lite0")  # or from_backbone(module, ...)
    clf.fit(support_images, labels)        # paths, PIL images or tensors; any shots per class
    clf.predict(query_images)              # class names
    clf.predict_proba(query_images)        # (N, K) probabilities
    clf.save("birds.clf"); FewShotClassifier.load("birds.clf")

Features come from the backbone with the test transform (resize the short side, centre
crop, normalise) through :func:`negmargin.features.embed`, under the runtime (device,
precision, memory format) that :func:`negmargin.runtime.resolve` derives from the config —
the meta-test's path; a fresh cosine head is fine-tuned on the support set with the
meta-test settings (``fit_heads``, one episode). Steps: the protocol's 150 for 5 support
images and 600 for 25, and for other sizes 24 per support image clipped to [150, 600]
(:func:`negmargin.config.default_finetune_steps`). Uneven shots are fine. The user's
files are found by :mod:`negmargin.imageio`; the command's output is the CLI's.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import content_digest, load_checkpoint
from .config import Config, default_finetune_steps, load_config
from .errors import CheckpointError, ConfigError, DataError, UserError
from .features import embed
from .fileio import atomic_save, file_sha256
from .finetune import FittedHeads, HeadState, compute_grams, fit_heads
from .imageio import ImageLike, Skipped, as_uint8, read_support_folder
from .model import load_trained_model
from .pretrained import Preprocessing, published, transformers_backbone
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

    def __init__(
        self, backbone: nn.Module, cfg: Config, runtime: Runtime, source: str = "the backbone"
    ) -> None:
        self.backbone = backbone.eval()
        self.cfg = cfg
        self.runtime = runtime
        self.source = source  # how errors name the model (its checkpoint file)
        self.classes: list = []  # the labels given to fit(), in their own type, first-seen order
        self.unknown_below: float | None = None  # the default open-set threshold of predict()
        self.steps: int | None = None  # fine-tune steps of the last fit (None: the protocol's rule)
        # What save() records to rebuild the backbone: a published name, a checkpoint, or a module.
        self.reference: dict[str, Any] = {"kind": "module", "class": type(backbone).__qualname__}
        self._heads: FittedHeads | None = None
        self._support: tuple[Tensor, Tensor] | None = None  # (n, D) features and (n,) class indices

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
        clf = cls(model.backbone, cfg, rt, source=f"checkpoint '{path}'")
        clf.reference = {"kind": "checkpoint", "path": str(Path(path).resolve()), "sha256": file_sha256(path)}
        return clf

    @classmethod
    def from_backbone(
        cls,
        backbone: nn.Module,
        preprocessing: Preprocessing,
        device: str = "auto",
        precision: str = "fp32",
    ) -> FewShotClassifier:
        """Any ``nn.Module`` that maps a batch of images (B, C, H, W) to features (B, D), with
        the preprocessing it expects; the Neg-Margin fine-tune runs on its features."""
        if not isinstance(backbone, nn.Module):
            raise UserError(f"backbone must be a torch.nn.Module, got {type(backbone).__name__}")
        pre = preprocessing
        data = {"image_size": pre.image_size, "test_resize": pre.resize, "mean": pre.mean, "std": pre.std,
                "channels": pre.channels}  # fmt: skip
        raw = {"data": data, "augment": {"interpolation": pre.interpolation},
               "train": {"device": device, "precision": precision, "channels_last": "off"}}  # fmt: skip
        cfg, rt = resolve(Config.from_dict(raw, source="the backbone's preprocessing").validate())
        return cls(backbone.to(rt.device), cfg, rt, source=f"the backbone {type(backbone).__name__}")

    @classmethod
    def from_transformers(
        cls, folder: str | Path, preprocessing: Preprocessing | None = None, device: str = "auto"
    ) -> FewShotClassifier:
        """A Hugging Face vision model saved in a local folder (``save_pretrained``): its pooled
        features, its preprocessing (``preprocessor_config.json``, or ``preprocessing``)."""
        backbone, pre = transformers_backbone(folder, preprocessing)
        clf = cls.from_backbone(backbone, pre, device)
        clf.reference = {"kind": "transformers", "folder": str(Path(folder).resolve()),
                         "preprocessing": asdict(pre)}  # fmt: skip
        return clf

    @classmethod
    def from_pretrained(cls, name: str, device: str = "auto") -> FewShotClassifier:
        """A published model by name (``negmargin models`` lists them); nothing is downloaded."""
        model = published(name)
        if model.checkpoint:  # a model trained here, shipped as an exported checkpoint
            clf = cls.from_checkpoint(model.checkpoint_path(), device)
        else:
            assert model.load is not None
            backbone, pre = model.load()
            clf = cls.from_backbone(backbone, pre, device)
        clf.source, clf.reference = f"the model '{name}'", {"kind": "published", "name": name}
        return clf

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
        if not torch.isfinite(feats).all():
            raise CheckpointError(
                f"{self.source} gives non-finite features (damaged weights, or a training run that "
                "diverged); no prediction is made"
            )
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
        feats = self.embed(images)
        self.classes = []
        return self.fit_features(feats, labels, steps)

    def fit_features(self, feats: Tensor, labels: Sequence, steps: int | None = None) -> FewShotClassifier:
        """Fit on (n, D) support features (from :meth:`embed`) and their n labels, added to those
        already fitted, if any."""
        labels = list(labels)
        if len(feats) != len(labels):
            raise UserError(f"{len(feats)} support features but {len(labels)} labels")
        classes = list(dict.fromkeys([*self.classes, *labels]))
        if len(classes) < 2:
            raise UserError(f"few-shot prediction needs at least 2 classes in the support set, got {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[label] for label in labels])
        if self.classes and self._support is not None:
            feats, y = torch.cat([self._support[0], feats]), torch.cat([self._support[1], y])
        n = len(y)
        steps = default_finetune_steps(n) if steps is None else positive_int("steps", steps)
        self._heads = fit_heads(feats[None], y[None], len(classes), [0], self.cfg.finetune, steps)
        self.classes, self._support, self.steps = classes, (feats, y), steps
        return self

    def add(
        self, images: Sequence[ImageLike], labels: Sequence, steps: int | None = None
    ) -> FewShotClassifier:
        """More support images, of fitted classes or new ones: the head is refitted on the stored
        support features plus these; the earlier images are not read again."""
        if self._heads is None:
            raise UserError("call fit() (or fit_folder()) before add()")
        images, labels = list(images), list(labels)
        if len(images) != len(labels):
            raise UserError(f"add: {len(images)} images but {len(labels)} labels")
        return self.fit_features(self.embed(images), labels, steps)

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
        threshold = self.unknown_below if unknown_below is None else unknown_below
        return self.labels_of(self.predict_proba(images), threshold, unknown_label)

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
        labels = self.labels_of(probs, self.unknown_below if unknown_below is None else unknown_below)
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

    # ------------------------------------------------------------------ a fitted classifier, kept
    def save(self, path: str | Path) -> Path:
        """One file with everything the fitted classifier is: the backbone reference (a published
        name, a checkpoint path with its sha256, or the module's class name), the transform, the
        classes, the support features and the fine-tuned head, the unknown threshold. Plain data:
        it loads with ``weights_only=True``, never running code."""
        if self._heads is None or self._support is None:
            raise UserError("call fit() before save(): there is no fitted classifier to keep")
        for c in self.classes:
            if not isinstance(c, (str, int, float, bool)):
                raise UserError(f"save: class labels must be str, int, float or bool, got {type(c).__name__}")
        h = self._heads
        data = {
            "format": CLASSIFIER_FORMAT,
            "format_version": 1,
            "reference": self.reference,
            "config": self.cfg.to_dict(),
            "classes": self.classes,
            "support": self._support[0],
            "support_labels": self._support[1],
            "init": h.init[0],
            "head": {"c": h.head.c[0], "A": h.head.A[0], "norm": h.head.norm[0]},
            "normalized": h.normalized,
            "steps": self.steps,
            "unknown_below": self.unknown_below,
        }
        data["sha256"] = content_digest(data)
        path = Path(path)
        atomic_save(path, lambda f: torch.save(data, f))
        return path

    @classmethod
    def load(
        cls, path: str | Path, backbone: nn.Module | None = None, device: str = "auto"
    ) -> FewShotClassifier:
        """A classifier written by :meth:`save`. ``backbone``: the module, for one saved with a
        backbone of your own (published models and checkpoints are found by themselves)."""
        path = Path(path)
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise UserError(f"classifier file '{path}' does not exist") from None
        except Exception as exc:  # noqa: BLE001 — any unreadable file is the same one-line error
            raise CheckpointError(f"'{path}' is not a readable classifier file: {str(exc)[:120]}") from None
        if not isinstance(data, dict) or data.get("format") != CLASSIFIER_FORMAT:
            raise CheckpointError(f"'{path}' is not a classifier file (written by FewShotClassifier.save)")
        if content_digest(data) != data.get("sha256"):
            raise CheckpointError(
                f"classifier file '{path}' is damaged: its content does not match its checksum"
            )
        ref = data["reference"]
        if ref["kind"] == "published":
            clf = cls.from_pretrained(ref["name"], device)
        elif ref["kind"] == "transformers":
            pre = ref["preprocessing"]
            pre = Preprocessing(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
            clf = cls.from_transformers(ref["folder"], pre, device)
        elif ref["kind"] == "checkpoint":
            ckpt = Path(ref["path"])
            if not ckpt.is_file() or file_sha256(ckpt) != ref["sha256"]:
                raise CheckpointError(
                    f"classifier '{path}' was fitted on the checkpoint '{ckpt}' (sha256 {ref['sha256'][:12]}…), "
                    "which is not there or has changed"
                )
            clf = cls.from_checkpoint(ckpt, device)
        else:
            if backbone is None:
                raise UserError(
                    f"classifier '{path}' was fitted on a backbone of your own ({ref.get('class')}); "
                    "pass it: FewShotClassifier.load(path, backbone=module)"
                )
            cfg = Config.from_dict(data["config"], source=f"config stored in {path}").validate()
            cfg, rt = resolve(replace(cfg, train=replace(cfg.train, device=device)))
            clf = cls(backbone.to(rt.device), cfg, rt, source=f"the backbone {type(backbone).__name__}")
        support, init, head = data["support"], data["init"], data["head"]
        normalized = bool(data["normalized"])
        clf._heads = FittedHeads(
            support[None], init[None], compute_grams(support[None], init[None], None, normalized),
            HeadState(head["c"][None], head["A"][None], head["norm"][None]), normalized,
        )  # fmt: skip
        clf.classes, clf._support = list(data["classes"]), (support, data["support_labels"])
        clf.steps, clf.unknown_below = data["steps"], data["unknown_below"]
        return clf


CLASSIFIER_FORMAT = "negmargin-classifier"
