"""What a dataset reader returns: one split's image list, before decoding."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..imageio import Skipped, list_images

SPLITS = ("train", "val", "test")


@dataclass
class SplitSource:
    """One split of a dataset as found on disk.

    Attributes:
        dataset: the reader's key (``cub``, ``mini_imagenet``, ...).
        split: ``train``, ``val`` or ``test``.
        class_names: names of this split's classes; label i names class i.
        labels: (n,) int64 class index of every image.
        items: n references the decoder understands (paths, or pickle indices).
        layout: one line saying which on-disk layout was found (for the log).
        fingerprint: checksum of the inputs' listing (names, sizes, mtimes); a
            cache built from the same listing is reused.
        decode: ``decode(item) -> bytes | str`` giving encoded bytes or a path;
            None means items are paths.
        peek: like ``decode`` but leaves the item in place (``decode`` may hand each
            item out once); used to read a few images' sizes before the cache is built.
            None with a ``decode``: the sizes are not sampled.
        rotations: (n,) number of 90° turns to apply after decoding (Omniglot's
            rotated classes), or None.
        metadata: extra per-class facts (e.g. tieredImageNet general categories).
        cache_variant: a suffix of the cache folder's name for a reader option that
            changes the split's contents (e.g. ``h60`` for 60 held-out images per
            class), so that both versions of a split keep their own cache.
    """

    dataset: str
    split: str
    class_names: list[str]
    labels: np.ndarray
    items: Sequence[Any]
    layout: str
    fingerprint: str
    decode: Callable[[Any], bytes | str] | None = None
    peek: Callable[[Any], bytes | str] | None = None
    rotations: np.ndarray | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    cache_variant: str = ""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.labels) != len(self.items):
            raise ValueError("labels and items differ in length")  # a reader bug

    def __len__(self) -> int:
        return len(self.items)

    def item_name(self, i: int) -> str:
        item = self.items[i]
        return str(item) if isinstance(item, (str, Path)) else f"{self.dataset}:{self.split}[{i}]"


def listing_fingerprint(paths: Sequence[str | Path], extra: str = "") -> str:
    """sha256 over (path, size, mtime) of every input file, in the given order."""
    digest = hashlib.sha256(extra.encode())
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{p}\tmissing\n".encode())
    return digest.hexdigest()


def require_dir(path: Path, what: str, how: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} '{path}' does not exist. {how}")
    return path


def check_disjoint(splits: Mapping[str, Sequence[str]], what: str = "class") -> None:
    """Overlapping splits are an error (a class in two splits leaks novel classes)."""
    seen: dict[str, str] = {}
    for split, names in splits.items():
        for name in names:
            if name in seen and seen[name] != split:
                raise DataError(
                    f"{what} '{name}' is in both the {seen[name]} and the {split} split; "
                    "splits must not overlap"
                )
            seen[name] = split


def class_images(
    folders: Sequence[Path],
    what: str,
    keep: Callable[[Path], bool] | None = None,
    skipped: Skipped | None = None,
) -> tuple[list[str], np.ndarray]:
    """Image paths of each class folder in turn and their labels (folder index).

    A class's images are every image file under its folder, sub-folders included — the
    rule of :func:`negmargin.imageio.list_images`, the same as for prediction; other files
    are recorded in ``skipped``. An empty folder is an error naming it (``what`` says what
    kind of folder).
    """
    paths: list[str] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = [f for f in list_images(folder, recursive=True, skipped=skipped) if keep is None or keep(f)]
        if not files:
            raise DataError(f"{what} '{folder}' has no image files; add images or remove it")
        paths += [str(f) for f in files]
        labels += [label] * len(files)
    return paths, np.array(labels, dtype=np.int64)
