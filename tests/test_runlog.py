"""Progress bars where stderr is not a terminal: a log file gets plain lines, not redraws."""

from __future__ import annotations

import io
import sys

from negmargin.runlog import progress_bar


class FileLike(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_progress_into_a_file_is_plain_lines(monkeypatch):
    err = FileLike()
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar(total=300, desc="extract", unit="img", leave=False) as bar:
        for _ in range(3):
            bar.update(100)
    for _ in progress_bar(range(5), desc="epochs", position=1):  # nested bars move the cursor on a tty
        pass
    text = err.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert lines and all(line.strip() for line in lines)
    assert any(line.startswith("extract: ") for line in lines) and any("5/5" in line for line in lines)
    assert len(lines) <= 6  # the first draw and the last, not one per update


def test_disabled_progress_writes_nothing(monkeypatch):
    err = FileLike()
    monkeypatch.setattr(sys, "stderr", err)
    for _ in progress_bar(range(10), desc="x", enabled=False):
        pass
    assert err.getvalue() == ""
