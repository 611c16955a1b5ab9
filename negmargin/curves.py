"""Training curves from a run's JSON-lines logs: ``negmargin plot``.

A run resumed across sittings writes one ``<stamp>.log.json`` per sitting; :func:`read_logs`
joins them in time order (an entry logged again after a resume replaces the earlier one), and
:func:`plot_curves` draws what a user looks at first: the validation accuracy with its 95% CI
and the best epoch, the training loss and running accuracy, and the learning rate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError


@dataclass
class Curves:
    """Per logged training interval: ``epoch_pos`` (fractional epoch), loss, running accuracy
    (over augmented, margin-shifted batches), lr, seconds per iteration; per validation:
    epoch, accuracy mean and 95% CI half-width."""

    epoch_pos: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    val_epoch: list[int] = field(default_factory=list)
    val_mean: list[float] = field(default_factory=list)
    val_ci95: list[float] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, accuracy) of the best validation (the first of equals, as training keeps)."""
        if not self.val_mean:
            return None
        i = max(range(len(self.val_mean)), key=lambda k: (self.val_mean[k], -k))
        return self.val_epoch[i], self.val_mean[i]


def log_files(paths: list[str | Path]) -> list[Path]:
    """The ``*.log.json`` files of ``paths`` in the order given (files, or work dirs searched
    non-recursively, their logs sorted by name: ``<start stamp>.log.json``)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.log.json"))
            if not found:
                raise DataError(f"'{p}' holds no training log (*.log.json): is it a run's work dir?")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"'{p}' does not exist (expected a work dir or a .log.json file)")
    return files


def read_logs(paths: list[str | Path]) -> Curves:
    """Join the logs of ``paths`` into :class:`Curves` (see the module)."""
    train: dict[tuple[int, int], dict] = {}
    val: dict[int, dict] = {}
    files = log_files(paths)
    # in time order — the order given, a work dir's logs by their names (start stamps) — so that a
    # later sitting's entries replace an earlier one's
    for path in files:
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if n == len(lines):
                    continue  # a line cut by a kill mid-write: the only one that can be
                raise DataError(f"'{path}' line {n} is not JSON: {line[:60]!r}") from None
            if entry.get("mode") == "train":
                train[(entry["epoch"], entry["iter"])] = entry
            elif entry.get("mode") == "val":
                val[entry["epoch"]] = entry
    curves = Curves(sources=[str(f) for f in files])
    iters: dict[int, int] = {}  # iterations per epoch: the largest logged 'iter' of each epoch
    for epoch, it in train:
        iters[epoch] = max(iters.get(epoch, 0), it)
    per_epoch = max(iters.values(), default=1)
    for (epoch, it), e in sorted(train.items()):
        curves.epoch_pos.append(epoch - 1 + it / per_epoch)
        curves.loss.append(e["loss"])
        curves.accuracy.append(e["accuracy"])
        curves.lr.append(e["lr"])
        curves.time.append(e.get("time", float("nan")))
    for epoch, e in sorted(val.items()):
        curves.val_epoch.append(epoch)
        curves.val_mean.append(e["accuracy_mean"])
        curves.val_ci95.append(e["accuracy_ci95"])
    return curves


def plot_curves(curves: Curves, path: str | Path, title: str = "") -> None:
    """Three panels (validation ± CI, training loss and accuracy, lr) in one png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise DataError("the figure needs matplotlib: pip install 'negmargin[plot]'") from None
    fig, (ax_val, ax_loss, ax_lr) = plt.subplots(1, 3, figsize=(14, 4.2))
    if curves.val_mean:
        ax_val.errorbar(curves.val_epoch, curves.val_mean, yerr=curves.val_ci95, marker="o", ms=3,
                        capsize=2, lw=1, label="val 5-way 1-shot ± 95% CI")  # fmt: skip
        epoch, acc = curves.best  # type: ignore[misc]
        ax_val.plot([epoch], [acc], "*", color="C3", ms=12, label=f"best: {acc:.2f} at epoch {epoch}")
        ax_val.legend(fontsize=8, loc="lower right")
    ax_val.set(title="validation (the checkpoint is chosen on it)", xlabel="epoch", ylabel="accuracy (%)")
    ax_loss.plot(curves.epoch_pos, curves.loss, color="C0", lw=1)
    ax_loss.set(title="training loss and running accuracy", xlabel="epoch", ylabel="loss")
    ax_acc = ax_loss.twinx()
    ax_acc.plot(curves.epoch_pos, curves.accuracy, color="C1", lw=1)
    ax_acc.set_ylabel("running accuracy on augmented batches (%)", color="C1")
    ax_lr.plot(curves.epoch_pos, curves.lr, color="C2", lw=1)
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr", yscale="log")
    for ax in (ax_val, ax_loss, ax_lr):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    from .fileio import atomic_save

    atomic_save(Path(path), lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
