"""Dataset readers (one module per on-disk format) and the packed image cache.

``DATASETS`` maps the config's ``data.dataset`` to a reader
``read(root, split, **data.options) -> SplitSource``; :func:`load_split` turns a
split into a memory-mapped :class:`PackedSplit`, preparing the cache on first use.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .base import SPLITS, SplitSource
from .cache import PackedSplit, StorePolicy, default_cache_dir, prepare
from .cub import read_cub
from .demo import read_demo
from .folder import read_folder
from .mini_imagenet import read_mini_imagenet
from .omniglot import read_omniglot
from .tiered_imagenet import read_tiered_imagenet

if TYPE_CHECKING:
    from ..config import Config

DATASETS: dict[str, Callable[..., SplitSource]] = {
    "cub": read_cub,
    "mini_imagenet": read_mini_imagenet,
    "tiered_imagenet": read_tiered_imagenet,
    "omniglot": read_omniglot,
    "folder": read_folder,
    "demo": read_demo,
}


def read_source(cfg: Config, split: str) -> SplitSource:
    name = cfg.data.dataset
    if not name:
        raise ConfigError(
            f"the config names no dataset: set data.dataset to one of {', '.join(sorted(DATASETS))} "
            "(data.dataset='folder' for your own <root>/<class>/ images)"
        )
    if not cfg.data.root:
        raise ConfigError(
            f"the config names no folder for the {name} data: set data.root (--data-root; prepare: --root)"
        )
    if name not in DATASETS:
        raise ConfigError(
            f"unknown dataset '{name}' (config key data.dataset); valid names: {', '.join(sorted(DATASETS))}"
        )
    reader = DATASETS[name]
    # A reader with the option ``base_holdout=k`` (mini_imagenet, omniglot) holds k images of
    # every base class out of ``train`` as a fourth split, ``train_holdout``, and checks it
    # itself; every other reader has the protocol's three splits only.
    holdout = ("train_holdout",) if "base_holdout" in inspect.signature(reader).parameters else ()
    if split not in (*SPLITS, *holdout):
        raise ValueError(f"split must be one of {(*SPLITS, *holdout)}, got {split!r}")
    return reader(cfg.data.root, split, **cfg.data.options)


def store_policy(cfg: Config, split: str) -> StorePolicy:
    """Train images keep detail for RandomResizedCrop; val/test are stored at the test resize."""
    if split == "train":
        return StorePolicy(cfg.data.train_store_size, False, "pil", cfg.data.channels)
    return StorePolicy(cfg.test_resize, True, cfg.augment.interpolation, cfg.data.channels)


def cache_dir_for(cfg: Config) -> Path:
    if cfg.data.cache_dir:
        return Path(cfg.data.cache_dir)
    return default_cache_dir(Path(cfg.data.root), cfg.data.dataset)


def load_split(
    cfg: Config, split: str, progress: bool = True, log: Callable[[str], None] | None = None
) -> PackedSplit:
    """Read ``split`` of the configured dataset through its packed cache."""
    source = read_source(cfg, split)
    packed = prepare(
        source,
        store_policy(cfg, split),
        cache_dir_for(cfg),
        workers=cfg.data.prepare_workers,
        skip_bad=cfg.data.skip_bad_images,
        progress=progress,
    )
    (log or (lambda m: print(m, file=sys.stderr)))(
        f"{split}: {len(packed)} images, {packed.num_classes} classes — {source.layout}"
    )
    return packed
