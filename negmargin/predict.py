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

import concurrent.futures as cf
import contextlib
import csv
import io
import json
import math
import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .augment import eval_view, to_input
from .checkpoint import load_checkpoint
from .config import Config, default_finetune_steps, load_config
from .distributed import local_device
from .errors import CheckpointError, ConfigError, DataError, UserError
from .fileio import atomic_write_text, probe_writable
from .finetune import FittedHeads, cpu_workers, fit_heads, intra_op_threads
from .imageio import is_image_file, read_image, to_array
from .model import load_trained_model

ImageLike = str | Path | Image.Image | Tensor | np.ndarray
UNKNOWN = "unknown"


# ------------------------------------------------------------------ one validation layer
# The CLI's argparse types and the Python API call the same checks, so a value is
# refused with the same words wherever it comes from (the CLI names the flag, the API
# the argument).


def positive_int(name: str, value) -> int:
    """``value`` as an int ≥ 1, or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def probability(name: str, value) -> float:
    """``value`` as a float in (0, 1), or a UserError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not 0 < value < 1:
        raise UserError(f"{name} must be a probability strictly between 0 and 1, got {value!r}")
    return float(value)


def check_output_path(path: str | Path, name: str = "--out") -> Path:
    """Fail before any work if ``path`` cannot be written (names the user's path, not a temp file)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{name} '{path}' is a folder; give a file name")
    folder = path.parent
    try:
        probe_writable(folder)
    except OSError as exc:
        raise UserError(f"cannot write {name} '{path}': {exc.strerror or exc} in '{folder}'") from None
    return path


@dataclass
class Skipped:
    """Files left out, by reason, for the one-line report."""

    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.reasons.setdefault(reason, []).append(name)

    def __len__(self) -> int:
        return sum(len(v) for v in self.reasons.values())

    def line(self, where: str) -> str | None:
        if not self.reasons:
            return None
        parts = []
        for reason, names in self.reasons.items():
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            parts.append(f"{len(names)} {reason} ({shown})")
        return f"skipped in {where}: " + "; ".join(parts)


def list_images(folder: Path, skipped: Skipped) -> list[Path]:
    """Every image file under ``folder``, sub-folders included, sorted.

    What counts as an image, everywhere (support and query folders alike): a file
    whose extension is one of :data:`negmargin.imageio.IMAGE_EXTENSIONS`. Hidden
    files and folders (``.DS_Store``, ``.ipynb_checkpoints``) and other files are
    left out and recorded in ``skipped``. A file named explicitly (not found in a
    folder) is always decoded, whatever its extension.
    """
    out = []
    for f in sorted(folder.rglob("*")):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            if f.is_file():
                skipped.add("hidden file(s)", str(f))
        elif f.is_file():
            if is_image_file(f):
                out.append(f)
            else:
                skipped.add("file(s) without an image extension", str(f))
    return out


class FewShotClassifier:
    """A trained backbone plus a cosine head fine-tuned on a support set."""

    def __init__(self, backbone: torch.nn.Module, cfg: Config, device: torch.device) -> None:
        self.backbone = backbone.eval()
        self.cfg = cfg
        self.device = device
        self.classes: list = []  # the labels given to fit(), in their own type, first-seen order
        self._heads: FittedHeads | None = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "auto", config: str | Path | None = None):
        """Load a negmargin checkpoint (its stored config, or ``config`` instead); reads the file once."""
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
        model, _ = load_trained_model(cfg, path, dev, ckpt)
        return cls(model.backbone, cfg, dev)

    # ------------------------------------------------------------------ features
    def _to_array(self, image: ImageLike, name: str) -> np.ndarray:
        channels = self.cfg.data.channels
        if isinstance(image, (str, Path)):
            return read_image(Path(image), channels)
        if isinstance(image, Image.Image):
            return to_array(image, channels)
        if not isinstance(image, (Tensor, np.ndarray)):
            raise DataError(
                f"{name}: expected a file path, a PIL image, a tensor or an array, got {type(image).__name__}"
            )
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
    def embed_each(
        self,
        images: Sequence[ImageLike],
        batch_size: int = 64,
        skip_bad: bool = False,
        progress: bool = False,
    ) -> tuple[Tensor, list[int], Skipped]:
        """Features of the images that decode, the positions they came from, and what was skipped.

        With ``skip_bad`` an image that cannot be decoded is left out and recorded;
        without it the first one raises a :class:`DataError` naming it.

        Returns:
            (M, D) float32 on the CPU, the M positions in ``images``, the skipped files.
        """
        batch_size = positive_int("batch_size", batch_size)
        cfg = self.cfg
        images = list(images)
        # On a CPU the cores take whole batches, each batch on one core (the meta-test
        # engine's rule, measured in bench/loaded.py): idle as fast as splitting every
        # convolution over the cores, and on a busy machine no op waits for a slowed core.
        workers = cpu_workers(self.device)
        if workers > 1:
            batch_size = min(batch_size, max(8, math.ceil(len(images) / (2 * workers))))

        def one_batch(start: int) -> tuple[Tensor | None, list[int], list[tuple[str, str]]]:
            views, kept, bad = [], [], []
            for i, im in enumerate(images[start : start + batch_size], start=start):
                try:
                    arr = self._to_array(im, f"image {i}")
                except DataError as exc:
                    if not skip_bad:
                        raise
                    bad.append(
                        (
                            "unreadable image(s)",
                            str(im) if isinstance(im, (str, Path)) else f"image {i}: {exc}",
                        )
                    )
                    continue
                views.append(eval_view(arr, cfg.test_resize, cfg.data.image_size, cfg.augment.interpolation))
                kept.append(i)
            feats = None
            if views:
                with torch.no_grad():  # grad mode is per thread
                    x = to_input(np.stack(views), cfg.data.mean, cfg.data.std, self.device)
                    feats = self.backbone(x).float().cpu()
            return feats, kept, bad

        out, kept, skipped = [], [], Skipped()
        starts = range(0, len(images), batch_size)
        with (
            tqdm(
                total=len(images), desc="embed", unit="img", disable=not progress, dynamic_ncols=True,
                file=sys.stderr, leave=False,
            ) as bar,  # closed (its line cleared) on an error too, so the error line stands alone
            intra_op_threads(1) if workers > 1 else contextlib.nullcontext(),
            cf.ThreadPoolExecutor(workers) as pool,
        ):  # fmt: skip
            for start, (feats, mine, bad) in zip(starts, pool.map(one_batch, starts)):  # in order
                if feats is not None:
                    out.append(feats)
                kept += mine
                for reason, name in bad:
                    skipped.add(reason, name)
                bar.update(min(batch_size, len(images) - start))
        return (torch.cat(out) if out else torch.empty(0, 0)), kept, skipped

    def embed(self, images: Sequence[ImageLike], batch_size: int = 64, progress: bool = False) -> Tensor:
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

    def fit_folder(self, folder: str | Path, steps: int | None = None, log=None) -> FewShotClassifier:
        """Support set from ``folder/<class name>/<images>`` (sub-folders of a class included)."""
        support = read_support_folder(folder)
        self.fit(support.paths, support.labels, steps)
        if log is not None:  # after the fit: an error stays the only line
            log(support.line())
            if len(support.skipped):
                log(support.skipped.line("the support folder"))
        return self

    def proba_of(self, features: Tensor) -> Tensor:
        """(N, D) query features (from :meth:`embed`) → (N, K) softmax of T·cos over the fitted classes."""
        if self._heads is None:
            raise UserError("call fit() (or fit_folder()) with a support set before predicting")
        if features.numel() == 0:
            return torch.empty(0, len(self.classes))
        cos = self._heads.scores(features[None])[0]
        return torch.softmax(self.cfg.finetune.temperature * cos, dim=-1).float()

    def labels_of(self, proba: Tensor, unknown_below: float | None = None, unknown_label=UNKNOWN) -> list:
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
        self, images: Sequence[ImageLike], unknown_below: float | None = None, unknown_label=UNKNOWN
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
        batch_size: int = 64,
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


@dataclass
class SupportSet:
    paths: list[Path]
    labels: list[str]
    folder: Path
    nested: int  # images found in sub-folders of a class folder
    skipped: Skipped

    def line(self) -> str:
        counts = Counter(self.labels)
        text = (
            f"support: {len(counts)} classes, {len(self.paths)} images "
            f"({', '.join(f'{c} {n}' for c, n in counts.items())})"
        )
        if self.nested:
            text += f"; {self.nested} of them in sub-folders of a class folder"
        return text


def read_support_folder(folder: str | Path) -> SupportSet:
    """``folder/<class>/**`` → the support set; clear errors for empty or odd folders.

    A class is a top-level sub-folder; its images are every image file under it,
    sub-folders included (the same rule as for query folders: :func:`list_images`).
    A file that is not an image is an error here, not a skip: the support set
    defines the classes, and a stray file in it is a mistake to fix.
    """
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
    paths, labels, nested, skipped = [], [], 0, Skipped()
    for c in classes:
        mine = Skipped()
        files = list_images(c, mine)
        strays = mine.reasons.get("file(s) without an image extension", [])
        if strays:
            raise DataError(
                f"'{strays[0]}' in the support set is not an image file; remove it or move it out"
            )
        for reason, names in mine.reasons.items():
            for name in names:
                skipped.add(reason, name)
        if not files:
            raise DataError(f"class folder '{c}' is empty; add at least one image or remove the folder")
        nested += sum(f.parent != c for f in files)
        paths += files
        labels += [c.name] * len(files)
    return SupportSet(paths, labels, folder, nested, skipped)


def collect_query_paths(items: Sequence[str | Path], what: str = "query") -> tuple[list[Path], Skipped]:
    """Files as given; folders expanded (recursively, :func:`list_images`) to their image files."""
    out: list[Path] = []
    skipped = Skipped()
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += list_images(p, skipped)
        elif p.is_file():
            out.append(p)
        else:
            raise DataError(f"{what} '{p}' does not exist")
    if not out:
        raise DataError(
            f"no {what} images found in {', '.join(map(str, items))}"
            + (f" ({skipped.line('the query folders')})" if len(skipped) else "")
        )
    return out, skipped


def summary_line(rows: list[dict], skipped: Skipped) -> str:
    counts = Counter(str(r["predicted"]) for r in rows)
    text = f"classified {len(rows)} images: " + ", ".join(f"{c} {n}" for c, n in counts.most_common())
    bad = skipped.reasons.get("unreadable image(s)", [])
    return text + (f"; {len(bad)} unreadable image(s) skipped" if bad else "")


def write_predictions(
    rows: list[dict],
    out: str | Path | None,
    as_json: bool,
    top_k: int = 3,
    log=lambda m: print(m, file=sys.stderr),
) -> None:
    """Print a table (or JSON) with the top-k classes and write CSV/JSON to ``out`` if given."""
    if as_json:
        print(json.dumps(rows, indent=1, default=str))
    elif rows:
        width = min(60, max(len(r["path"]) for r in rows))
        k = max(len(r["top_k"]) for r in rows)
        title = f"{'image':<{width}}  {'predicted':<20} {'prob':>6}"
        if k > 1:
            title += "  " + "  ".join(f"top{i}" for i in range(2, k + 1))
        print(title)
        for r in rows:
            line = f"{r['path'][-width:]:<{width}}  {str(r['predicted']):<20} {r['probability']:>6.3f}"
            if k > 1:
                line += "  " + "  ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top_k"][1:])
            print(line)
    if out is None:
        return
    out = Path(out)
    if as_json or out.suffix.lower() == ".json":
        atomic_write_text(out, json.dumps(rows, indent=1, default=str))
    else:
        buf = io.StringIO()
        writer = csv.writer(buf)
        k = max((len(r["top_k"]) for r in rows), default=top_k)
        header: list[str] = ["path", "predicted", "probability"]
        for i in range(1, k + 1):
            header += [f"top{i}_class", f"top{i}_probability"]
        writer.writerow(header)
        for r in rows:
            row = [r["path"], r["predicted"], r["probability"]]
            for t in r["top_k"]:
                row += [t["class"], t["probability"]]
            writer.writerow(row)
        atomic_write_text(out, buf.getvalue())
    log(f"wrote {len(rows)} predictions to {out}")
