"""Omniglot (Lake et al.): 1623 handwritten characters, 20 drawings each.

Layout: ``<root>/images_background/<Alphabet>/characterNN/*.png`` (30 alphabets,
964 characters) and ``<root>/images_evaluation/...`` (20 alphabets, 659).

Split (Lake's: learn on the background set, test on the evaluation set):

* train: every background character; with ``options.rotations=True`` each is
  also present turned by 90°, 180° and 270° as three more classes (3856 classes),
  the common augmentation of the Vinyals protocol;
* val: the 5 evaluation alphabets in :data:`VAL_ALPHABETS` (144 characters);
* test: the other 15 evaluation alphabets (515 characters).

With ``options.base_holdout=k`` the last k drawers (of 20) of every background
character are held out of ``train`` and form the split ``train_holdout``: the
base-class accuracy of a trained head is measured there (bench/margin_study.py omniglot).

Images are binary 105×105; they are stored grayscale (``data.channels=1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from .base import SplitSource, class_images, listing_fingerprint, require_dir

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


def _drawer(path: Path) -> int:
    """The drawer number DD of an Omniglot file IIII_DD.png (1-20)."""
    try:
        return int(path.stem.split("_")[-1])
    except ValueError:
        return 0


def read_omniglot(
    root: str | Path, split: str, rotations: bool = False, base_holdout: int = 0, **options
) -> SplitSource:
    if options:
        raise DataError(
            f"the omniglot reader takes data.options rotations and base_holdout, got {sorted(options)}"
        )
    if not 0 <= base_holdout < 20:
        raise DataError(f"data.options.base_holdout must be in 0..19, got {base_holdout}")
    if split == "train_holdout" and not base_holdout:
        raise DataError("the split train_holdout needs data.options.base_holdout > 0")
    root = Path(root)
    require_dir(root, "Omniglot root", HOW)
    background = require_dir(root / "images_background", "Omniglot folder", HOW)
    evaluation = require_dir(root / "images_evaluation", "Omniglot folder", HOW)
    if split in ("train", "train_holdout"):
        alphabets = sorted(p.name for p in background.iterdir() if p.is_dir())
        chars = _characters(background, alphabets)
    else:
        all_eval = sorted(p.name for p in evaluation.iterdir() if p.is_dir())
        missing = [a for a in VAL_ALPHABETS if a not in all_eval]
        if missing:
            raise DataError(f"Omniglot evaluation set lacks the alphabet(s) {', '.join(missing)}. {HOW}")
        alphabets = list(VAL_ALPHABETS) if split == "val" else [a for a in all_eval if a not in VAL_ALPHABETS]
        chars = _characters(evaluation, alphabets)
    turns = (0, 1, 2, 3) if (rotations and split in ("train", "train_holdout")) else (0,)
    keep = None
    if split == "train" and base_holdout:
        keep = lambda f: _drawer(f) <= 20 - base_holdout  # noqa: E731
    elif split == "train_holdout":
        keep = lambda f: _drawer(f) > 20 - base_holdout  # noqa: E731
    base_paths, base_labels = class_images([folder for _, folder in chars], "Omniglot character folder", keep)
    # Rotated copies are further classes: same files, labels shifted by turn × characters.
    paths = base_paths * len(turns)
    labels = np.concatenate([base_labels + turn * len(chars) for turn in turns])
    rots = np.repeat(np.array(turns, dtype=np.int64), len(base_paths))
    names = [name if turn == 0 else f"{name}@rot{90 * turn}" for turn in turns for name, _ in chars]
    return SplitSource(
        dataset="omniglot",
        split=split,
        class_names=names,
        labels=labels,
        items=paths,
        layout=(
            f"Omniglot {'images_background' if split.startswith('train') else 'images_evaluation'}, "
            f"{len(alphabets)} alphabets, {len(names)} classes"
            + (" (× 4 rotations)" if len(turns) > 1 else "")
        ),
        fingerprint=listing_fingerprint(paths, extra=f"omniglot/{split}/rot{len(turns)}/h{base_holdout}"),
        rotations=rots if len(turns) > 1 else None,
        metadata={"alphabets": alphabets},
    )
