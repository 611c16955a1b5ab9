"""Crash-safe file writes.

Every output (checkpoint, log, result, cache) is written to a temporary file in
the same folder, flushed to disk, then renamed over the target: a crash or a
kill during the write leaves the previous file intact, never a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import UserError
from .faults import kill_point

# Refuse to start a write that would leave less than this free on the device.
MIN_FREE_BYTES = 16 * 2**20


class DiskFullError(UserError):
    """Too little disk space to write an output."""


def check_free_space(folder: Path, need_bytes: int, what: str, elsewhere: str = "another --work-dir") -> None:
    """Raise a clear error if ``folder``'s device cannot take ``need_bytes`` more
    (``elsewhere``: the setting that moves the output to another folder)."""
    free = shutil.disk_usage(folder).free
    if free < need_bytes + MIN_FREE_BYTES:
        raise DiskFullError(
            f"not enough disk space to write {what} in '{folder}': "
            f"{free / 2**20:.0f} MiB free, about {(need_bytes + MIN_FREE_BYTES) / 2**20:.0f} MiB "
            f"needed; free some space or choose {elsewhere}"
        )


class WriteError(UserError):
    """An output could not be written (permissions, file-size limit, I/O error)."""


@functools.cache
def _umask() -> int:
    """The process umask, read once: reading it means setting it, which must not race with
    other threads creating files on every write."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path``; on success fsync and rename it to ``path``.

    The file gets the permissions a plain ``open`` would give (0666 less the umask), not
    the 0600 of a temporary file. A write that fails for any OS reason raises a one-line
    error naming ``path``; the previous version of the file stays intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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
                f"disk full (or over quota) while writing '{path}'; the previous version of the file "
                "is intact; free some space and run again (training resumes with --auto-resume)"
            ) from None
        if exc.errno == errno.EFBIG:
            raise WriteError(
                f"cannot write '{path}': the file is larger than this system or user allows "
                "(ulimit -f / file-size limit); the previous version of the file is intact"
            ) from None
        raise WriteError(
            f"cannot write '{path}': {exc.strerror or exc}; the previous version of the file is intact"
        ) from None
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


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


@contextlib.contextmanager
def work_dir_lock(folder: Path, enabled: bool = True) -> Iterator[None]:
    """Keep a second process out of ``folder`` while the block runs (``folder/.lock``).

    The lock file names the holder (pid, host, start time, command). A lock left by a
    process that no longer runs on this host (killed with SIGKILL, say) is taken over.
    """
    if not enabled:
        yield
        return
    lock = Path(folder) / ".lock"
    me = f"{os.getpid()} {socket.gethostname()} {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(sys.argv)[:200]}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # os.open applies the umask
        except FileExistsError:
            holder = lock.read_text(errors="replace").strip().split(" ", 3) if lock.is_file() else []
            pid = int(holder[0]) if holder and holder[0].isdigit() else -1
            if len(holder) >= 3 and (holder[1] != socket.gethostname() or process_alive(pid)):
                raise UserError(
                    f"work dir '{folder}' is in use by process {pid} on {holder[1]} (started "
                    f"{' '.join(holder[2:])[:80]}); wait for it to finish or choose another --work-dir"
                ) from None
            with contextlib.suppress(OSError):  # a dead process's lock: take it over
                os.unlink(lock)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(me + "\n")
        break
    else:
        raise UserError(f"cannot lock work dir '{folder}' ({lock}); remove the file if no run uses it")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
