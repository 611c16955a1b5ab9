"""Fault injection for the kill-and-resume tests.

``NEGMARGIN_KILL_AT=<point>[@<n>]`` makes the process SIGKILL itself the n-th
time (default: the 1st) it reaches ``<point>``. Points: ``iter:<global iteration>``
(after an optimizer step), ``val`` (inside a validation, after its features are
extracted), ``write:<file name>`` (a checkpoint or result file fully written to
its temporary name, not yet renamed over the old one). With
``NEGMARGIN_KILL_RANK=r`` only the process of that torchrun rank is killed.
Unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def kill_point(point: str) -> None:
    spec = os.environ.get("NEGMARGIN_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if point != target:
        return
    only = os.environ.get("NEGMARGIN_KILL_RANK")
    if only is not None and only != os.environ.get("RANK", "0"):
        return
    _seen[point] += 1
    if _seen[point] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
