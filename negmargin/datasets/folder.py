"""A user's own dataset: ``<root>/<class name>/*`` image files.

Which classes are base (train), val and novel (test) is given by either

* three class-list files (one class name per line): ``data.options.split_files =
  dict(train="train.txt", val="val.txt", test="test.txt")`` (paths relative to the
  root); ``train.txt``/``val.txt``/``test.txt`` in the root are used when present; or
* a fraction rule: ``data.options.split_fractions = (0.6, 0.2, 0.2)`` and
  ``data.options.split_seed = 0``: the sorted class names are shuffled with the
  seed and cut in that proportion (the default when no list files exist).

Any common format and mode is read (see negmargin/imageio.py); files whose
extension is not an image extension are ignored.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SPLITS, SplitSource, check_disjoint, class_images, listing_fingerprint, require_dir

HOW = "Lay the images out as <root>/<class name>/<image files> (config key data.root or --data-root)."


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"class-list file '{path}' does not exist (data.options.split_files)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def split_by_fraction(names: list[str], fractions: tuple[float, ...], seed: int) -> dict[str, list[str]]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise DataError(f"data.options.split_fractions must be 3 non-negative numbers, got {fractions}")
    total = float(sum(fractions))
    order = np.random.default_rng(seed).permutation(len(names))
    shuffled = [sorted(names)[i] for i in order]
    n_train = int(round(fractions[0] / total * len(names)))
    n_val = int(round(fractions[1] / total * len(names)))
    return {
        "train": sorted(shuffled[:n_train]),
        "val": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }


def resolve_splits(root: Path, options: dict) -> tuple[dict[str, list[str]], str]:
    names = class_folders(root)
    if not names:
        raise DataError(f"dataset root '{root}' has no class folders. {HOW}")
    split_files = options.get("split_files")
    if split_files is None and all((root / f"{s}.txt").is_file() for s in SPLITS):
        split_files = {s: f"{s}.txt" for s in SPLITS}
    if split_files is not None:
        if not isinstance(split_files, dict) or set(split_files) != set(SPLITS):
            raise DataError("data.options.split_files must be dict(train=..., val=..., test=...)")
        splits = {s: _read_list(root / split_files[s]) for s in SPLITS}
        how = "class lists " + ", ".join(str(split_files[s]) for s in SPLITS)
        for s, listed in splits.items():
            unknown = [n for n in listed if n not in names]
            if unknown:
                raise DataError(f"class '{unknown[0]}' of {split_files[s]} has no folder in '{root}'")
    else:
        fractions = tuple(options.get("split_fractions", (0.6, 0.2, 0.2)))
        seed = int(options.get("split_seed", 0))
        splits = split_by_fraction(names, fractions, seed)
        how = f"fractions {fractions} with seed {seed}"
    check_disjoint(splits)
    return splits, how


def read_folder(root: str | Path, split: str, **options) -> SplitSource:
    allowed = {"split_files", "split_fractions", "split_seed"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise DataError(
            f"unknown data.options key(s) {unknown} for the folder reader; valid: {sorted(allowed)}"
        )
    root = Path(root)
    require_dir(root, "dataset root", HOW)
    splits, how = resolve_splits(root, options)
    classes = splits[split]
    if not classes:
        raise DataError(f"the {split} split of '{root}' has no classes ({how})")
    paths, labels = class_images([root / name for name in classes], "class folder")
    return SplitSource(
        dataset="folder",
        split=split,
        class_names=classes,
        labels=labels,
        items=paths,
        layout=f"image folders <root>/<class>/*, split by {how} ({len(classes)} {split} classes)",
        fingerprint=listing_fingerprint(paths, extra=f"folder/{split}/{how}"),
    )
