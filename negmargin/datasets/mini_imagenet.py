"""miniImageNet (Ravi & Larochelle split: 64 / 16 / 20 classes, 600 images each).

``<root>/{train,val,test}.csv`` (header ``filename,label``; the label is the
ImageNet wnid) with the images in any of three layouts, detected in this order:

(b) the pre-resized release: ``<root>/images/<csv filename>`` (84×84 jpgs);
(a) original ImageNet files: ``<root>/images/<wnid>/<wnid>_<n>.JPEG``; csv file
    ``n0153282900000005.jpg`` is the 5th (last 5 digits, 1-based) file of its
    class folder sorted by the number after the last ``_`` — the reference's mapping;
(c) class folders anywhere under the root: ``<root>/**/<wnid>/<csv filename>``
    (e.g. ``train/n01532829/n0153282900000005.jpg``).

``data.options.base_holdout=k`` (off by default, so the protocol stays exact)
holds the last k csv rows of every base class out of ``train``; they form the
split ``train_holdout``, on which a trained head's base-class accuracy is measured.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SplitSource, check_disjoint, listing_fingerprint

HOW = (
    "miniImageNet needs <root>/{train,val,test}.csv (the Ravi & Larochelle split, header "
    "'filename,label') and the images as <root>/images/<csv filename> (pre-resized release), "
    "<root>/images/<wnid>/<wnid>_<n>.JPEG (original ImageNet files), or "
    "<root>/<any folder>/<wnid>/<csv filename>; the csv files come with the split of "
    "Ravi & Larochelle (github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet)."
)


def read_csv(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"miniImageNet split file '{path}' does not exist. {HOW}")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise DataError(f"'{path}' must start with the header 'filename,label'")
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2:
            raise DataError(f"'{path}' line {line}: expected 'filename,label', got {row!r}")
        out.append((row[0].strip(), row[1].strip()))
    return out


def original_index(filename: str) -> int:
    """0-based position of a csv filename in its class folder (reference mapping)."""
    return int(Path(filename).stem[-5:]) - 1


def _numeric_suffix(name: str) -> int:
    try:
        return int(name.split(".")[0].split("_")[-1])
    except ValueError:
        return -1


def _find_class_dirs(root: Path, wnids: set[str], max_depth: int = 4) -> dict[str, Path]:
    found: dict[str, Path] = {}
    base_depth = len(root.parts)
    for dirpath, dirnames, _ in os.walk(root):
        depth = len(Path(dirpath).parts) - base_depth
        if depth >= max_depth:
            dirnames[:] = []
        for d in dirnames:
            if d in wnids and d not in found:
                found[d] = Path(dirpath) / d
    return found


def holdout_rows(rows: list[tuple[str, str]], split: str, k: int) -> list[tuple[str, str]]:
    """``train`` without / ``train_holdout`` with the last ``k`` rows of every class (csv order)."""
    seen: dict[str, int] = {}
    for _, w in rows:
        seen[w] = seen.get(w, 0) + 1
    small = [w for w, n in seen.items() if n <= k]
    if small:
        raise DataError(
            f"data.options.base_holdout={k} leaves no training image for class(es) {', '.join(small[:5])} "
            f"(they have {min(seen[w] for w in small)} rows in train.csv)"
        )
    position: dict[str, int] = {}
    out = []
    for f, w in rows:
        position[w] = position.get(w, 0) + 1
        held = position[w] > seen[w] - k
        if held == (split == "train_holdout"):
            out.append((f, w))
    return out


def read_mini_imagenet(root: str | Path, split: str, base_holdout: int = 0, **options) -> SplitSource:
    if options:
        raise DataError(
            f"the mini_imagenet reader takes the data.options base_holdout only, got {sorted(options)}"
        )
    if not isinstance(base_holdout, int) or base_holdout < 0:
        raise DataError(f"data.options.base_holdout must be an integer ≥ 0, got {base_holdout!r}")
    if split == "train_holdout" and not base_holdout:
        raise DataError("the split train_holdout needs data.options.base_holdout > 0")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"miniImageNet root '{root}' does not exist. {HOW}")
    csv_split = "train" if split == "train_holdout" else split
    rows = read_csv(root / f"{csv_split}.csv")
    if not rows:
        raise DataError(f"'{root / f'{csv_split}.csv'}' lists no images")
    if base_holdout and csv_split == "train":
        rows = holdout_rows(rows, split, base_holdout)
    others = {
        s: [w for _, w in read_csv(root / f"{s}.csv")]
        for s in ("train", "val", "test")
        if (root / f"{s}.csv").is_file()
    }
    check_disjoint({s: sorted(set(v)) for s, v in others.items()})
    class_names = list(dict.fromkeys(w for _, w in rows))  # csv order
    wnids = set(class_names)
    first_file, first_wnid = rows[0]
    images = root / "images"

    if (images / first_file).is_file():
        layout = "pre-resized release: images/<csv filename>"
        paths = [images / f for f, _ in rows]
    elif (images / first_wnid).is_dir():
        layout = "original ImageNet files: images/<wnid>/<wnid>_<n>.JPEG (reference index mapping)"
        listing: dict[str, list[str]] = {}
        for w in class_names:
            folder = images / w
            files = sorted(os.listdir(folder), key=_numeric_suffix) if folder.is_dir() else []
            listing[w] = files
        paths = []
        for f, w in rows:
            k = original_index(f)
            files = listing[w]
            paths.append(images / w / files[k] if 0 <= k < len(files) else images / w / f"<#{k + 1}>")
    else:
        dirs = _find_class_dirs(root, wnids)
        if first_wnid not in dirs or not (dirs[first_wnid] / first_file).is_file():
            raise DataError(
                f"cannot find the image '{first_file}' of class {first_wnid} (first row of "
                f"{split}.csv) under '{root}' in any known layout. {HOW}"
            )
        layout = f"class folders: <root>/.../<wnid>/<csv filename> (e.g. {dirs[first_wnid]})"
        paths = [dirs.get(w, root / "<missing>" / w) / f for f, w in rows]

    exists = [p.is_file() for p in paths]
    if not all(exists):
        per_class: dict[str, int] = {}
        for (_, w), ok in zip(rows, exists):
            per_class[w] = per_class.get(w, 0) + int(ok)
        empty = [w for w, n in per_class.items() if n == 0]
        if empty:
            raise DataError(
                f"miniImageNet ({layout}): no images found for class(es) {', '.join(empty[:10])}"
                f"{' ...' if len(empty) > 10 else ''} of {split}.csv under '{root}'"
            )
        missing = [str(p) for p, ok in zip(paths, exists) if not ok]
        raise DataError(
            f"miniImageNet ({layout}): {len(missing)} image(s) listed in {split}.csv are "
            f"missing, e.g. {', '.join(missing[:5])}"
        )
    index = {w: i for i, w in enumerate(class_names)}
    labels = np.array([index[w] for _, w in rows])
    str_paths = [str(p) for p in paths]
    return SplitSource(
        dataset="mini_imagenet",
        split=split,
        class_names=class_names,
        labels=labels,
        items=str_paths,
        layout=f"miniImageNet {csv_split}.csv"
        + (
            f" ({'last' if split == 'train_holdout' else 'without the last'} {base_holdout} rows per class)"
            if base_holdout and csv_split == "train"
            else ""
        )
        + f", {layout}",
        fingerprint=listing_fingerprint(
            [root / f"{csv_split}.csv", *str_paths], extra=f"mini/{split}/h{base_holdout}"
        ),
        cache_variant=f"h{base_holdout}" if base_holdout and csv_split == "train" else "",
    )
