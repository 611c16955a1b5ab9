"""tieredImageNet (Ren et al. release: 351 / 97 / 160 classes, 34 categories).

``<root>/{split}_images_png.pkl`` is a pickled list of PNG-encoded images (bytes
or uint8 arrays); ``<root>/{split}_labels.pkl`` a dict with ``label_specific``,
``label_general``, ``label_specific_str``, ``label_general_str``.

Pickles can run code when loaded, so both files are read with an unpickler that
only builds lists, dicts, strings, bytes and NumPy arrays and refuses anything
else. The image list is loaded once; the cache builder decodes it in chunks and
drops each PNG string once decoded, so the split's bytes are never held twice.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from .base import SplitSource, listing_fingerprint

HOW = (
    "tieredImageNet needs <root>/{train,val,test}_images_png.pkl and "
    "<root>/{train,val,test}_labels.pkl from the release of Ren et al. "
    "(github.com/renmengye/few-shot-ssl-public#tieredimagenet)."
)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("collections", "OrderedDict"),
}


class SafeUnpickler(pickle.Unpickler):
    """Builds only plain containers and NumPy arrays; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")


def safe_load_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            return SafeUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"'{path}' is not a plain data pickle: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"'{path}' is truncated or not a pickle: {exc}") from None


def _text(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def read_labels(path: Path) -> dict[str, Any]:
    raw = safe_load_pickle(path)
    if not isinstance(raw, dict):
        raise DataError(f"'{path}' must hold a dict, got {type(raw).__name__}")
    labels = {_text(k): v for k, v in raw.items()}
    need = ("label_specific", "label_general", "label_specific_str", "label_general_str")
    missing = [k for k in need if k not in labels]
    if missing:
        raise DataError(f"'{path}' lacks the key(s) {', '.join(missing)}; expected {', '.join(need)}")
    return labels


class PickledImages:
    """The PNG list of one split; calling it with i hands out item i and forgets it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._items: list[Any] | None = None

    def load(self) -> list[Any]:
        if self._items is None:
            items = safe_load_pickle(self.path)
            if isinstance(items, np.ndarray) and items.dtype == object:
                items = list(items)
            if not isinstance(items, (list, tuple)):
                raise DataError(
                    f"'{self.path}' must hold a list of PNG byte strings, got {type(items).__name__}"
                )
            self._items = list(items)
        return self._items

    def peek(self, index: int) -> bytes:
        """Item ``index``, left in place."""
        value = self.load()[index]
        if value is None:
            raise DataError(f"'{self.path}' item {index} was already decoded")
        return value.tobytes() if isinstance(value, np.ndarray) else bytes(value)

    def __call__(self, index: int) -> bytes:
        payload = self.peek(index)
        self.load()[index] = None  # decoded once; free the PNG bytes
        return payload


def read_tiered_imagenet(root: str | Path, split: str, **options) -> SplitSource:
    if options:
        raise DataError(f"the tiered_imagenet reader takes no data.options, got {sorted(options)}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"tieredImageNet root '{root}' does not exist. {HOW}")
    images_path = root / f"{split}_images_png.pkl"
    labels_path = root / f"{split}_labels.pkl"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise DataError(f"tieredImageNet file '{p}' does not exist. {HOW}")
    labels = read_labels(labels_path)
    images = PickledImages(images_path)
    specific = np.asarray(labels["label_specific"], dtype=np.int64)
    general = np.asarray(labels["label_general"], dtype=np.int64)
    specific_names = [_text(s) for s in labels["label_specific_str"]]
    general_names = [_text(s) for s in labels["label_general_str"]]
    if len(specific) != len(general):
        raise DataError(f"'{labels_path}': label_specific and label_general differ in length")
    if len(specific) and (specific.min() < 0 or specific.max() >= len(specific_names)):
        raise DataError(f"'{labels_path}': label_specific indexes outside label_specific_str")
    # Category of each specific class (the first image of the class decides).
    category: dict[int, str] = {}
    for s, g in zip(specific.tolist(), general.tolist()):
        category.setdefault(s, general_names[g] if 0 <= g < len(general_names) else str(g))
    return SplitSource(
        dataset="tiered_imagenet",
        split=split,
        class_names=specific_names,
        labels=specific,
        items=list(range(len(specific))),
        layout=f"tieredImageNet pickles {images_path.name} + {labels_path.name}",
        fingerprint=listing_fingerprint([images_path, labels_path], extra="tiered/" + split),
        decode=images,
        peek=images.peek,
        metadata={
            "general_categories": [category.get(i, "") for i in range(len(specific_names))],
            "n_general": len(general_names),
        },
    )
