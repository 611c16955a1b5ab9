"""Crash-safe file writes.

Every output (checkpoint, log, result, cache) is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a crash or a
kill during the write leaves the previous file intact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError
from .faults import kill_point

# Refuse to start a write that would leave less than this free on the device.
MIN_FREE_BYTES = 16 * 2**20


class DiskFullError(UserError):
    """Too little disk space to write an output."""


def check_free_space(folder: Path, need_bytes: int, what: str) -> None:
    """Raise a clear error if ``folder``'s device cannot take ``need_bytes`` more."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes + MIN_FREE_BYTES:
        raise DiskFullError(
            f"not enough disk space to write {what} in '{folder}': "
            f"{free / 2**20:.0f} MiB free, about {(need_bytes + MIN_FREE_BYTES) / 2**20:.0f} MiB "
            "needed; free some space or choose another --work-dir"
        )


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on success fsync and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        kill_point(f"write:{path.name}")
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(
                f"disk full while writing '{path}'; the previous version of the file is "
                "intact; free some space and run again (training resumes with --auto-resume)"
            ) from None
        raise
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save(path: str | Path, writer: Callable[[IO[bytes]], None], size_hint: int = 0) -> None:
    """Serialise with ``writer(buffer)`` in memory, check space, write atomically."""
    buffer = io.BytesIO()
    writer(buffer)
    data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_free_space(path.parent, max(len(data), size_hint), f"'{path.name}'")
    atomic_write_bytes(path, data)


def append_line(path: str | Path, line: str) -> None:
    """Append one line to a log and flush it: a kill loses at most the line being written."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line.rstrip("\n") + "\n")
        handle.flush()


def probe_writable(folder: Path) -> None:
    """Create ``folder`` if needed and write and remove an empty file in it; OSError if that fails."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".write-test-{os.getpid()}"
    probe.write_bytes(b"")
    probe.unlink()


def ensure_writable_dir(folder: str | Path, what: str = "work dir") -> Path:
    """Create ``folder`` if needed and check that files can be written in it."""
    folder = Path(folder)
    try:
        probe_writable(folder)
    except OSError as exc:
        raise UserError(
            f"cannot write to the {what} '{folder}' ({exc.strerror}); choose a writable "
            "folder with --work-dir"
        ) from None
    return folder
