"""Shared fixtures: tiny generated datasets and configs (no network, no real data)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from negmargin.config import Config
from negmargin.datasets.demo import generate
from negmargin.testing import tiny_raw
from negmargin.train import run

os.environ.setdefault(
    "NEGMARGIN_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "negmargin-test-cache")
)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """20 procedurally drawn classes × 12 images (10 base / 5 val / 5 novel), 48×48 PNG."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, n_classes=20, n_images=12, split_sizes=(10, 5, 5), seed=3, progress=False)
    return root


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"

    def make(**sections) -> Config:
        return Config.from_dict(tiny_raw(tiny_root, cache, **sections)).validate()

    return make


@pytest.fixture(scope="session")
def model_and_images(tiny_root, tmp_path_factory):
    """A checkpoint trained on the tiny base classes; support/query folders from its novel classes."""
    tmp = tmp_path_factory.mktemp("predict")
    raw = tiny_raw(tiny_root, tmp / "cache", train={"epochs": 2})
    run(Config.from_dict(raw).validate(), tmp / "wd", progress=False)
    novel = (tiny_root / "test.txt").read_text().split()
    for c in novel:
        files = sorted((tiny_root / c).glob("*.png"))
        (tmp / "support" / c).mkdir(parents=True)
        (tmp / "query" / c).mkdir(parents=True)
        for f in files[:3]:
            shutil.copy(f, tmp / "support" / c / f.name)
        for f in files[3:]:
            shutil.copy(f, tmp / "query" / c / f.name)
    return tmp, tmp / "wd" / "best_accuracy_mean.pth", raw
