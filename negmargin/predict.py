"""Few-shot prediction on a user's own images.

    clf = FewShotClassifier.from_checkpoint("work_dir/.../best_accuracy_mean.pth")
    clf.fit(support_images, labels)        # paths, PIL images or tensors; any shots per class
    clf.predict(query_images)              # class names
    clf.predict_proba(query_images)        # (N, K) probabilities

Features come from the checkpoint's backbone with the test transform (resize the
short side, centre crop, normalise); a fresh cosine head is fine-tuned on the
support set with the meta-test settings — the same engine as the benchmark
meta-test, with one episode. Steps: the protocol's 150 for 5 support images and
600 for 25, and for other sizes 24 per support image clipped to [150, 600]
(:func:`negmargin.config.default_finetune_steps`). Uneven shots are fine.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checkpoint import load_checkpoint
from .config import Config, default_finetune_steps, load_config
from .distributed import local_device
from .errors import CheckpointError, ConfigError, DataError, UserError
from .fileio import atomic_write_text
from .finetune import FinetuneSettings, compute_grams, episode_randomness, finetune, query_scores
from .imageio import is_image_file, read_image, to_array
from .metatest import eval_view, settings_for, to_input

ImageLike = str | Path | Image.Image | Tensor | np.ndarray


class FewShotClassifier:
    """A trained backbone plus a cosine head fine-tuned on a support set."""

    def __init__(self, backbone: torch.nn.Module, cfg: Config, device: torch.device) -> None:
        self.backbone = backbone.eval()
        self.cfg = cfg
        self.device = device
        self.classes: list[str] = []
        self._support: Tensor | None = None
        self._init: Tensor | None = None
        self._head = None
        self.settings: FinetuneSettings | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", config: str | Path | None = None):
        """Load a negmargin checkpoint (its stored config, or ``config`` instead)."""
        from .evaluate import load_trained_model

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
        dev = local_device(device)
        cfg = replace(cfg, train=replace(cfg.train, device=str(dev)))
        model, _ = load_trained_model(cfg, path, dev)
        return cls(model.backbone, cfg, dev)

    # ------------------------------------------------------------------ features
    def _to_array(self, image: ImageLike, name: str) -> np.ndarray:
        channels = self.cfg.data.channels
        if isinstance(image, (str, Path)):
            path = Path(image)
            if path.is_file() and not is_image_file(path):
                raise DataError(
                    f"'{path}' is not an image file (extension {path.suffix or 'none'}); "
                    "remove it or pass image files only"
                )
            return read_image(path, channels)
        if isinstance(image, Image.Image):
            return to_array(image, channels)
        arr = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
        if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) → (H, W, C)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3:
            raise DataError(
                f"{name}: expected an image array of shape (H, W, C) or (C, H, W), got {arr.shape}"
            )
        if arr.dtype != np.uint8:
            top = 1.0 if float(arr.max(initial=0)) <= 1.0 else 255.0  # floats in [0, 1] or [0, 255]
            arr = np.clip(np.round(arr.astype(np.float64) / top * 255), 0, 255).astype(np.uint8)
        if arr.shape[2] != channels:
            arr = to_array(Image.fromarray(arr.squeeze(-1) if arr.shape[2] == 1 else arr), channels)
        return arr

    @torch.no_grad()
    def embed(self, images: Sequence[ImageLike], batch_size: int = 64) -> Tensor:
        """Backbone features of the images under the test transform: (N, D) float32, CPU."""
        cfg = self.cfg
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            views = [
                eval_view(
                    self._to_array(im, f"image {start + i}"),
                    cfg.test_resize,
                    cfg.data.image_size,
                    cfg.augment.interpolation,
                )
                for i, im in enumerate(chunk)
            ]
            x = to_input(np.stack(views), cfg, self.device)
            out.append(self.backbone(x).float().cpu())
        if not out:
            return torch.empty(0, 0)
        return torch.cat(out)

    # ------------------------------------------------------------------ support / query
    def fit(
        self, images: Sequence[ImageLike], labels: Sequence, steps: int | None = None
    ) -> FewShotClassifier:
        """Fine-tune a fresh head on labelled support images (≥ 2 classes, ≥ 1 image each)."""
        if len(images) != len(labels):
            raise UserError(f"fit: {len(images)} images but {len(labels)} labels")
        classes = list(dict.fromkeys(str(label) for label in labels))
        if len(classes) < 2:
            raise UserError(f"few-shot prediction needs at least 2 classes in the support set, got {classes}")
        index = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([index[str(label)] for label in labels])
        feats = self.embed(list(images))
        n, dim = feats.shape
        ft = self.cfg.finetune
        settings = settings_for(self.cfg.meta_test, ft)
        settings = replace(settings, steps=steps or default_finetune_steps(n))
        init, orders = episode_randomness([0], len(classes), dim, n, settings)
        grams = compute_grams(feats[None], init)
        self._head = finetune(grams, y[None], orders, settings)
        self._support, self._init, self.classes, self.settings = feats, init, classes, settings
        return self

    def fit_folder(self, folder: str | Path, steps: int | None = None) -> FewShotClassifier:
        """Support set from ``folder/<class name>/<images>``."""
        paths, labels = read_support_folder(folder)
        return self.fit(paths, labels, steps)

    def predict_proba(self, images: Sequence[ImageLike]) -> Tensor:
        """(N, K) softmax of T·cos over the fitted classes."""
        if self._head is None:
            raise UserError("call fit() (or fit_folder()) with a support set before predicting")
        q = self.embed(list(images))
        grams = compute_grams(self._support[None], self._init, q[None])
        cos = query_scores(grams, self._head)[0]
        return torch.softmax(self.settings.temperature * cos, dim=-1).float()

    def predict(self, images: Sequence[ImageLike]) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(images).argmax(-1).tolist()]

    def predict_paths(self, paths: Sequence[Path], top_k: int = 3) -> list[dict]:
        probs = self.predict_proba(paths)
        k = min(top_k, len(self.classes))
        top_p, top_i = probs.topk(k, dim=-1)
        rows = []
        for path, ps, ids in zip(paths, top_p.tolist(), top_i.tolist()):
            rows.append(
                {
                    "path": str(path),
                    "predicted": self.classes[ids[0]],
                    "probability": round(ps[0], 6),
                    "top_k": [
                        {"class": self.classes[i], "probability": round(p, 6)} for p, i in zip(ps, ids)
                    ],
                }
            )
        return rows


def read_support_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """``folder/<class>/*`` → (paths, class names); clear errors for empty or odd folders."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(
            f"support folder '{folder}' does not exist; it should hold one sub-folder "
            "of labelled images per class"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(
            f"support folder '{folder}' has {len(classes)} class folder(s); few-shot prediction "
            "needs at least 2 (one sub-folder of images per class)"
        )
    paths, labels = [], []
    for c in classes:
        files = sorted(p for p in c.iterdir() if p.is_file() and not p.name.startswith("."))
        for f in files:
            if not is_image_file(f):
                raise DataError(f"'{f}' in the support set is not an image file; remove it or move it out")
        if not files:
            raise DataError(f"class folder '{c}' is empty; add at least one image or remove the folder")
        paths += files
        labels += [c.name] * len(files)
    return paths, labels


def collect_query_paths(items: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders expanded (recursively) to their image files, sorted."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith(".")
            )
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"query '{p}' does not exist")
    if not out:
        raise DataError(f"no query images found in {', '.join(map(str, items))}")
    return out


def write_predictions(rows: list[dict], out: str | Path | None, as_json: bool, top_k: int) -> None:
    """Print a short table (or JSON) and write CSV/JSON to ``out`` if given."""
    if as_json:
        text = json.dumps(rows, indent=1)
        print(text)
    else:
        width = min(60, max(len(r["path"]) for r in rows))
        print(f"{'image':<{width}}  {'predicted':<20} {'prob':>6}")
        for r in rows:
            print(f"{r['path'][-width:]:<{width}}  {r['predicted']:<20} {r['probability']:>6.3f}")
    if out is None:
        return
    out = Path(out)
    if as_json or out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=1))
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        k = max(len(r["top_k"]) for r in rows)
        header = ["path", "predicted", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_probability"]
        writer.writerow(header)
        for r in rows:
            row = [r["path"], r["predicted"], r["probability"]]
            for t in r["top_k"]:
                row += [t["class"], t["probability"]]
            writer.writerow(row)
        atomic_write_text(out, buf.getvalue())
    print(f"wrote {len(rows)} predictions to {out}", file=sys.stderr)
