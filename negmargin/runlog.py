"""Run logs: a text log and a JSON-lines log in the work dir, mirrored to the console;
progress bars that suit where stderr goes.

Only the main process writes. Each line is appended and flushed at once, so a
kill loses at most the line being written.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

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


# Cursor movement and colour codes that tqdm writes for nested bars.
_ESCAPES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _PlainLines:
    """A stream for tqdm where stderr is not a terminal (a log file, CI): each redraw
    becomes one plain line; escape codes and the blank redraws that clear a bar go."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        for part in re.split(r"[\r\n]", _ESCAPES.sub("", text)):
            if part.strip():
                self.stream.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Any = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr: redrawn in place on a terminal; elsewhere a plain line at
    most once a minute (and at the end), so a log file holds lines, not redraws."""
    if not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, dynamic_ncols=True, file=sys.stderr, **kwargs)
    return tqdm(iterable, file=_PlainLines(sys.stderr), mininterval=60, ncols=100, ascii=True, **kwargs)
