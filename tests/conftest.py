"""Shared fixtures: tiny generated datasets and configs (no network, no real data)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from negmargin.config import Config
from negmargin.datasets.demo import generate

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault(
    "NEGMARGIN_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "negmargin-test-cache")
)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """20 procedurally drawn classes × 12 images (10 base / 5 val / 5 novel), 48×48 PNG."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate(root, n_classes=20, n_images=12, split_sizes=(10, 5, 5), seed=3, progress=False)
    return root


def tiny_raw(root: Path, cache: Path, **sections) -> dict:
    raw = {
        "name": "tiny",
        "data": {
            "dataset": "folder",
            "root": str(root),
            "image_size": 32,
            "train_store_size": 0,
            "cache_dir": str(cache),
            "prepare_workers": 1,
        },
        "model": {"backbone": "conv4", "margin": -0.01},
        "augment": {"crop_scale": (0.25, 1.0)},
        "train": {
            "epochs": 2,
            "batch_size": 16,
            "warmup_iters": 5,
            "milestones": [1],
            "log_interval": 5,
            "workers": 0,
            "checkpoint_interval": 1,
        },
        "val": {"interval": 1, "n_query": 5, "n_episodes": 10},
        "meta_test": {"n_query": 5, "n_episodes": 20},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


@pytest.fixture
def tiny_cfg(tiny_root, tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "tiny-cache"

    def make(**sections) -> Config:
        return Config.from_dict(tiny_raw(tiny_root, cache, **sections)).validate()

    return make


def write_config(path: Path, raw: dict) -> Path:
    """A config file (literal assignments) from a raw dict."""
    lines = [f"{k} = {v!r}\n" for k, v in raw.items()]
    path.write_text("".join(lines))
    return path


def run_cli(args: list[str], cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run a command line in a fresh Python process; returns CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
