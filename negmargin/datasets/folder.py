"""A user's own dataset: ``<root>/<class name>/*`` image files.

Which classes are base (train), val and novel (test) is given by either

* three class-list files (one class name per line): ``data.options.split_files =
  dict(train="train.txt", val="val.txt", test="test.txt")`` (paths relative to the
  root); ``train.txt``/``val.txt``/``test.txt`` in the root are used when present; or
* a fraction rule: ``data.options.split_fractions = (0.6, 0.2, 0.2)`` and
  ``data.options.split_seed = 0`` (the default when no list files exist): each class
  goes to a split by a hash of (seed, its name) against the cumulative fractions, so
  adding, removing or renaming one class never moves another one between splits (a
  checkpoint's base classes stay out of its test split). The proportions hold on
  average; with few classes a split can come out small or empty (an error then:
  write the three list files instead).

A partial set of ``train.txt``/``val.txt``/``test.txt`` in the root is an error: the
lists are used together or not at all.

Any common format and mode is read (see negmargin/imageio.py); files whose
extension is not an image extension are ignored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..imageio import Skipped
from .base import SPLITS, SplitSource, check_disjoint, class_images, listing_fingerprint, require_dir

HOW = "Lay the images out as <root>/<class name>/<image files> (config key data.root or --data-root)."


def class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"class-list file '{path}' does not exist (data.options.split_files)")
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]  # -sig: a BOM
    return [n for n in names if n and not n.startswith("#")]


def class_position(name: str, seed: int) -> float:
    """A class's place in [0, 1): a hash of (seed, name), the same on every machine and run."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_by_fraction(names: list[str], fractions: Any, seed: Any) -> dict[str, list[str]]:
    """Each class to the split whose cumulative fraction its :func:`class_position` falls under."""
    if (
        not isinstance(fractions, (tuple, list))
        or len(fractions) != 3
        or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fractions)
        or sum(fractions) <= 0
    ):
        raise DataError(f"data.options.split_fractions must be 3 non-negative numbers, got {fractions!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise DataError(f"data.options.split_seed must be an integer, got {seed!r}")
    total = float(sum(fractions))
    cuts = (fractions[0] / total, (fractions[0] + fractions[1]) / total)
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for name in sorted(names):
        u = class_position(name, seed)
        splits["train" if u < cuts[0] else "val" if u < cuts[1] else "test"].append(name)
    return splits


def resolve_splits(root: Path, options: dict) -> tuple[dict[str, list[str]], str]:
    names = class_folders(root)
    if not names:
        raise DataError(f"dataset root '{root}' has no class folders. {HOW}")
    split_files = options.get("split_files")
    present = [f"{s}.txt" for s in SPLITS if (root / f"{s}.txt").is_file()]
    if split_files is None and len(present) == len(SPLITS):
        split_files = {s: f"{s}.txt" for s in SPLITS}
    elif split_files is None and present:
        missing = [f"{s}.txt" for s in SPLITS if f"{s}.txt" not in present]
        raise DataError(
            f"'{root}' has {' and '.join(present)} but no {' or '.join(missing)}: the class lists are used "
            "all three or not at all (without them the classes are split by data.options.split_fractions)"
        )
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
        fractions = options.get("split_fractions", (0.6, 0.2, 0.2))
        seed = options.get("split_seed", 0)
        splits = split_by_fraction(names, fractions, seed)
        how = f"fractions {tuple(fractions)} with seed {seed} (by class-name hash)"
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
        raise DataError(
            f"the {split} split of '{root}' has no classes ({how}); list the classes of each split "
            "in train.txt, val.txt and test.txt in the root"
        )
    skipped = Skipped()
    paths, labels = class_images([root / name for name in classes], "class folder", skipped=skipped)
    report = skipped.line("the class folders")
    return SplitSource(
        dataset="folder",
        split=split,
        class_names=classes,
        labels=labels,
        items=paths,
        layout=f"image folders <root>/<class>/**, split by {how} ({len(classes)} {split} classes)"
        + (f"; {report}" if report else ""),
        fingerprint=listing_fingerprint(paths, extra=f"folder/{split}/{how}"),
    )
