"""Omniglot (Lake et al.): 1623 handwritten characters, 20 drawings each.

Layout: ``<root>/images_background/<Alphabet>/characterNN/*.png`` (30 alphabets,
964 characters) and ``<root>/images_evaluation/...`` (20 alphabets, 659).

Split (Lake's: learn on the background set, test on the evaluation set):

* train: every background character; with ``options.rotations=True`` each is
  also present turned by 90°, 180° and 270° as three more classes (3856 classes),
  the common augmentation of the Vinyals protocol;
* val: the 5 evaluation alphabets in :data:`VAL_ALPHABETS` (144 characters);
* test: the other 15 evaluation alphabets (515 characters).

Images are binary 105×105; they are stored grayscale (``data.channels=1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SplitSource, list_images, listing_fingerprint, require_dir

VAL_ALPHABETS = ("Angelic", "Glagolitic", "Keble", "Sylheti", "Tengwar")

HOW = (
    "Omniglot needs <root>/images_background/<Alphabet>/characterNN/*.png and "
    "<root>/images_evaluation/...; unzip images_background.zip and images_evaluation.zip "
    "from github.com/brendenlake/omniglot (python/) into the root."
)


def _characters(folder: Path, alphabets: list[str]) -> list[tuple[str, Path]]:
    out = []
    for alphabet in alphabets:
        for char in sorted(p for p in (folder / alphabet).iterdir() if p.is_dir()):
            out.append((f"{alphabet}/{char.name}", char))
    return out


def read_omniglot(root: str | Path, split: str, rotations: bool = False, **options) -> SplitSource:
    if options:
        raise DataError(f"the omniglot reader takes only data.options.rotations, got {sorted(options)}")
    root = Path(root)
    require_dir(root, "Omniglot root", HOW)
    background = require_dir(root / "images_background", "Omniglot folder", HOW)
    evaluation = require_dir(root / "images_evaluation", "Omniglot folder", HOW)
    if split == "train":
        alphabets = sorted(p.name for p in background.iterdir() if p.is_dir())
        chars = _characters(background, alphabets)
    else:
        all_eval = sorted(p.name for p in evaluation.iterdir() if p.is_dir())
        missing = [a for a in VAL_ALPHABETS if a not in all_eval]
        if missing:
            raise DataError(f"Omniglot evaluation set lacks the alphabet(s) {', '.join(missing)}. {HOW}")
        alphabets = list(VAL_ALPHABETS) if split == "val" else [a for a in all_eval if a not in VAL_ALPHABETS]
        chars = _characters(evaluation, alphabets)
    turns = (0, 1, 2, 3) if (rotations and split == "train") else (0,)
    names, paths, labels, rots = [], [], [], []
    for turn in turns:
        for name, folder in chars:
            files = list_images(folder)
            if not files:
                raise DataError(f"Omniglot character folder '{folder}' has no images")
            label = len(names)
            names.append(name if turn == 0 else f"{name}@rot{90 * turn}")
            paths += [str(f) for f in files]
            labels += [label] * len(files)
            rots += [turn] * len(files)
    return SplitSource(
        dataset="omniglot",
        split=split,
        class_names=names,
        labels=np.array(labels),
        items=paths,
        layout=(
            f"Omniglot {'images_background' if split == 'train' else 'images_evaluation'}, "
            f"{len(alphabets)} alphabets, {len(names)} classes"
            + (" (× 4 rotations)" if len(turns) > 1 else "")
        ),
        fingerprint=listing_fingerprint(paths, extra=f"omniglot/{split}/rot{len(turns)}"),
        rotations=np.array(rots, dtype=np.int64) if len(turns) > 1 else None,
        metadata={"alphabets": alphabets},
    )
