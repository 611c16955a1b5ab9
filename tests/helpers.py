"""Helpers the tests import (fixtures live in conftest.py, which is not imported)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from negmargin.testing import tiny_raw, write_config

REPO = Path(__file__).resolve().parents[1]

__all__ = ["REPO", "run_cli", "tiny_raw", "write_config"]


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
