"""Run logs: a text log and a JSON-lines log in the work dir, mirrored to the console.

Only the main process writes. Each line is appended and flushed at once, so a
kill loses at most the line being written.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .fileio import append_line


class RunLog:
    def __init__(self, work_dir: Path | None, enabled: bool = True, echo: bool = True) -> None:
        self.enabled = enabled
        self.echo = echo and enabled
        stamp = time.strftime("%Y%m%d_%H%M%S")
        self.text_path = work_dir / f"{stamp}.log" if (work_dir and enabled) else None
        self.json_path = work_dir / f"{stamp}.log.json" if (work_dir and enabled) else None

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} - {message}"
        if self.text_path:
            append_line(self.text_path, line)
        if self.echo:
            tqdm.write(message, file=sys.stdout)

    def record(self, **fields) -> None:
        """One JSON object per line (train intervals, validations)."""
        if self.enabled and self.json_path:
            append_line(self.json_path, json.dumps(fields, separators=(",", ":")))
