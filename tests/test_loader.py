"""The training loader: where its work runs, and that this never changes the batches."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from negmargin.datasets import load_split
from negmargin.loader import Placement, TrainLoader


def test_batches_are_the_same_wherever_the_augmentation_runs(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(train={"batch_size": 8})
    packed = load_split(cfg, "train", progress=False, log=lambda _: None)
    finished_in: set[str] = set()
    finish = TrainLoader.finish

    def spy(self, item):
        finished_in.add(threading.current_thread().name)
        return finish(self, item)

    monkeypatch.setattr(TrainLoader, "finish", spy)
    runs = {}
    for workers in (0, 1, 3):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, workers=workers))
        loader = TrainLoader(packed, c, 8, torch.device("cpu"))
        # Short cycles, so that both placements serve batches in these two epochs.
        loader.placement = Placement(lag=loader.depth, cycle=2 * (loader.depth + 3), measure=2, settle=1)
        runs[workers] = [(x, y) for epoch in (0, 1) for x, y, _ in loader.epoch(epoch)]
        # A resumed epoch replays the same batches from its iteration on.
        resumed = [x for x, _, _ in loader.epoch(0, 2)]
        assert all(torch.equal(a[0], b) for a, b in zip(runs[workers][2:], resumed))
    assert len(runs[0]) == 2 * len(loader) >= 16
    for workers in (1, 3):
        for (x0, y0), (x, y) in zip(runs[0], runs[workers]):
            assert torch.equal(x0, x) and torch.equal(y0, y)
            assert x.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(runs[0][0][0], runs[0][len(loader)][0])  # epochs differ
    main = threading.current_thread().name
    assert main in finished_in and any(n.startswith("negmargin-augment") for n in finished_in)


def feed(placement: Placement, first: int, cycles: int, inline: float, background: float) -> list[str]:
    """Run cycles ``first`` … ``first + cycles - 1``, whose iterations take ``inline`` or
    ``background`` seconds. Per cycle: "-" no probe, "p" a probe that changed nothing,
    "B"/"I" a probe that moved the augmentation to the background threads / in line."""
    out = []
    for c in range(first, first + cycles):
        before = placement.in_background
        probed = any(
            placement.choose(i) != before for i in range(c * placement.cycle, (c + 1) * placement.cycle)
        )
        for i in range(c * placement.cycle, (c + 1) * placement.cycle):
            bg = placement.choose(i)
            placement.record(i, bg, background if bg else inline)
        moved = placement.in_background != before
        out.append(("B" if placement.in_background else "I") if moved else "p" if probed else "-")
    return out


def test_placement_probes_backs_off_and_keeps_the_faster_way():
    p = Placement(lag=2, cycle=100, margin=0.03, max_every=8)  # probes of 12 iterations
    assert sum(p.choose(i) for i in range(100)) == 12
    # Alone on the cores (in line faster): stays in line, probing ever more rarely.
    assert "".join(feed(p, 0, 17, inline=0.150, background=0.160)) == "p-p-p---p-------p"
    assert not p.notes
    # Another process takes a core (background faster): moved at the next probe (cycle 24);
    # then the probes of the training thread start again at the next cycle and back off.
    assert "".join(feed(p, 17, 13, inline=0.750, background=0.440)) == "-------Bpp-p-"
    assert p.notes == [
        "input path: augmenting in the background threads from iteration 2500 (440 vs 750 ms per iteration)"
    ]
    assert sum(p.choose(i) for i in range(2900, 3000)) == 100  # no probe in cycle 29
    # Back alone: noticed at the next probe (cycle 32), back in line.
    assert "".join(feed(p, 30, 3, inline=0.150, background=0.160)) == "--I"
    # Within the margin (3%) nothing moves.
    assert "".join(feed(p, 33, 2, inline=0.150, background=0.147)) == "pp"


def test_placement_skips_the_iterations_next_to_a_change():
    # Around each change the queued batches carry the other way's cost: the settle
    # iterations after the probe starts, the lag iterations before it ends and before the
    # cycle ends. Make exactly those misleading (the background looking fast and the
    # training thread slow) while the training thread is faster everywhere else.
    p = Placement(lag=2, cycle=40, measure=6, settle=2)  # probe = 10 iterations
    for i in range(40):
        bg = p.choose(i)
        misleading = i in (0, 1, 8, 9, 38, 39)
        p.record(i, bg, (0.05 if bg else 0.3) if misleading else (0.16 if bg else 0.15))
    assert not p.in_background and not p.notes
    # A cycle with too few records (an epoch's first iteration, a resumed start) decides nothing.
    q = Placement(lag=2, cycle=40, measure=6, settle=2)
    for i in range(30, 40):
        q.record(i, False, 0.2)
    assert not q.in_background and not q.notes
    with pytest.raises(ValueError):
        Placement(lag=2, cycle=20)
