"""CUB-200-2011 with the Baseline++ class split (100 / 50 / 50).

Layout: ``<root>/images/<NNN.Class_Name>/*.jpg`` (uncropped images, every file).
The 200 folder names are sorted; class index i goes to train if i % 2 == 0, to
val if i % 4 == 1, to test if i % 4 == 3 — the split of Chen et al. (A Closer
Look at Few-shot Classification) that the reference uses. Other libraries use a
random 140/30/30 split; numbers from the two splits are not comparable.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError
from ..imageio import Skipped
from .base import SplitSource, class_images, listing_fingerprint, require_dir

HOW = (
    "Download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
    "and extract it so that <root>/images/001.Black_footed_Albatross/*.jpg exists "
    "(config key data.root, or --data-root)."
)


def split_classes(names: list[str], split: str) -> list[str]:
    """The Baseline++ rule on the sorted class folder names."""
    names = sorted(names)
    rule = {"train": lambda i: i % 2 == 0, "val": lambda i: i % 4 == 1, "test": lambda i: i % 4 == 3}
    return [n for i, n in enumerate(names) if rule[split](i)]


def read_cub(root: str | Path, split: str, **options) -> SplitSource:
    if options:
        raise DataError(f"the cub reader takes no data.options, got {sorted(options)}")
    root = Path(root)
    images = require_dir(root / "images", "CUB image folder", HOW)
    all_classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    if len(all_classes) != 200:
        raise DataError(
            f"CUB image folder '{images}' has {len(all_classes)} class folders, expected 200. {HOW}"
        )
    classes = split_classes(all_classes, split)
    skipped = Skipped()
    paths, labels = class_images([images / name for name in classes], "CUB class folder", skipped=skipped)
    report = skipped.line("the class folders")
    return SplitSource(
        dataset="cub",
        split=split,
        class_names=classes,
        labels=labels,
        items=paths,
        layout=f"CUB-200-2011 images/<class>/*.jpg, Baseline++ split ({len(classes)} {split} classes)"
        + (f"; {report}" if report else ""),
        fingerprint=listing_fingerprint(paths, extra=f"cub/{split}"),
    )
