"""Base training: the loop, validation, checkpoints, resume.

``run(cfg, work_dir)`` is the whole of ``tools/classification/train.py``:

    batch → backbone → Neg-Margin head → cross-entropy → backward → SGD

Every ``val.interval`` epochs (and after the last) the model is meta-tested on
the fixed val episodes; ``best_accuracy_mean.pth`` is rewritten whenever that
mean strictly improves. ``latest.pth`` is written after every epoch and when the
run is stopped with SIGTERM/SIGINT, so ``--auto-resume`` continues where it
stopped. A checkpoint is a :class:`TrainState`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as dist
from . import fused_norm
from .checkpoint import load_checkpoint, load_model_weights, rng_state, save_checkpoint, set_rng_state
from .config import Config, dump_config
from .datasets import PackedSplit, load_split
from .episodes import sample_episodes
from .errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
from .faults import kill_point
from .features import extract_features
from .fileio import work_dir_lock
from .loader import TrainLoader
from .meta_test import MetaTestResult, meta_test_episodes
from .model import FewShotModel, build_model
from .runlog import RunLog, progress_bar
from .runtime import (
    Runtime,
    configure_process,
    machine_line,
    main_first,
    peak_memory_mib,
    resolve,
    seed_everything,
    start_run,
)
from .schedule import lr_at


def run(
    cfg: Config,
    work_dir: str | Path,
    resume_from: str | Path | None = None,
    auto_resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train, validate and checkpoint; returns a summary dict.

    A work dir that holds a run is resumed (``auto_resume``, ``resume_from``) or refused;
    ``overwrite`` removes its checkpoints and starts over. One process at a time: a second
    one started into the same work dir stops with a line naming the first.
    """
    work_dir = Path(work_dir)
    log, show = start_run(cfg, work_dir, progress)
    with work_dir_lock(work_dir, enabled=dist.is_main()):
        resume_path = find_resume(work_dir, resume_from, auto_resume)
        if resume_path is None:
            claim_fresh(work_dir, overwrite, log)
        return run_training(cfg, work_dir, log, show, resume_path)


def run_training(
    cfg: Config, work_dir: Path, log: RunLog, show: bool, resume_path: Path | None
) -> dict[str, Any]:
    """The run itself (see :func:`run`): data, model, the loop, validation, checkpoints."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    with main_first() as main:
        train_split = load_split(cfg, "train", progress=show, log=log.info)
        val_split = load_split(cfg, "val", progress=show, log=log.info)
    cfg, rt = resolve(cfg, num_classes=train_split.num_classes)
    configure_process(cfg, rt)
    num_classes = check_num_classes(cfg, train_split)

    model = build_model(cfg, num_classes).to(rt.device)
    model = model.to(memory_format=rt.memory_format)  # type: ignore[call-overload]
    if cfg.train.sync_bn and dist.world_size() > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    fused_note = ""
    if cfg.train.fused_norm:
        fused, fused_note = fused_norm.enable(model.backbone, rt.device)
        if not fused and rt.device.type == "cpu" and main:
            print(f"warning: {fused_note}", file=sys.stderr)
    if cfg.train.compile:
        model.backbone.compile()  # in place: the checkpoint keys stay the module's own
    optimizer, per_process, base_lr = make_optimizer(cfg, model)
    episodes = sample_episodes(
        val_split.labels, cfg.val.n_way, cfg.val.n_shot, cfg.val.n_query, cfg.val.n_episodes,
        cfg.val.episode_seed, val_split.class_names, where="val split",
    )  # fmt: skip
    state = TrainState(model, optimizer, episodes, list(train_split.class_names))
    if resume_path is not None:
        state.resume(resume_path, cfg)
        log.info(f"resumed from {resume_path} at epoch {state.epoch + 1}, iteration {state.iteration}")
    ddp = dist.wrap(model, rt.device)
    loader = TrainLoader(
        train_split, cfg, per_process, rt.device, dist.rank(), dist.world_size(), rt.channels_last
    )
    if main:
        dump_config(cfg, work_dir / f"{cfg.name}.py", note=f"resolved on {machine_line(rt)}")
        malloc = f"cpu_malloc {cfg.train.cpu_malloc}; " if rt.device.type == "cpu" else ""
        log.info(
            f"work dir {work_dir}; {machine_line(rt)}; {dist.world_size()} process(es); "
            f"channels_last {rt.channels_last}; {malloc}{num_classes} head classes; "
            f"{len(loader)} iterations/epoch of {per_process} images per process; test resize "
            f"{cfg.data.test_resize}; fine-tune steps val {cfg.val.steps}, test {cfg.meta_test.steps} "
            f"(resolved config: {work_dir / (cfg.name + '.py')})"
        )
        if fused_note:
            log.info(fused_note)

    t_start = time.time()
    with StopRequest() as stop:
        for epoch in progress_bar(
            range(state.epoch, cfg.train.epochs), desc="epochs", unit="epoch", initial=state.epoch,
            total=cfg.train.epochs, enabled=show,
        ):  # fmt: skip
            meter = Meter()
            for images, labels, lr, data_time in train_batches(state, loader, cfg, base_lr, epoch, show):
                with rt.autocast():
                    logits, sims = ddp(images, labels)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                kill_point(f"iter:{epoch * len(loader) + state.iteration + 1}")
                state.iteration += 1
                meter.add(loss.detach(), (sims.argmax(1) == labels).float().mean(), data_time)  # no sync
                log_step(log, meter, state, cfg, epoch, len(loader), lr, work_dir, rt.device)
                if stop.requested(rt.device):
                    meter.check_finite(state, work_dir)  # before these weights are written
                    stop.exit(log, state, cfg, work_dir, f"epoch {epoch + 1}, iteration {state.iteration}")
            state.epoch, state.iteration = epoch + 1, 0
            for note in loader.placement.notes:
                log.info(note)
            loader.placement.notes.clear()
            after_epoch(state, cfg, rt, val_split, work_dir, log, show, len(loader))
            if stop.requested(rt.device):
                stop.exit(log, state, cfg, work_dir, f"the end of epoch {epoch + 1}")
    dist.barrier()
    return summarise(state, work_dir, time.time() - t_start, log)


def summarise(state: TrainState, work_dir: Path, seconds: float, log: RunLog) -> dict[str, Any]:
    if state.best is not None:
        log.info(
            f"done: best val accuracy {state.best:.2f} at epoch {state.best_epoch}; "
            f"checkpoint {work_dir / 'best_accuracy_mean.pth'}"
        )
    return {
        "work_dir": str(work_dir),
        "best_accuracy_mean": state.best,
        "best_epoch": state.best_epoch,
        "best_checkpoint": str(work_dir / "best_accuracy_mean.pth"),
        "train_seconds": round(seconds, 1),
        "history": state.history,
    }


# --------------------------------------------------------------------------- set-up


def check_num_classes(cfg: Config, train_split: PackedSplit) -> int:
    num_classes = train_split.num_classes if cfg.model.num_classes is None else cfg.model.num_classes
    if num_classes < train_split.num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} but the train split has {train_split.num_classes} "
            "classes; raise it or set it to None (take it from the data)"
        )
    return num_classes


def make_optimizer(cfg: Config, model: nn.Module) -> tuple[torch.optim.Optimizer, int, float]:
    """SGD and the DDP batch rule: (optimizer, images per process, learning rate).

    ``ddp_scaling="none"`` splits the global batch over the processes and keeps the
    learning rate; ``"linear"`` keeps ``batch_size`` per process and multiplies the
    learning rate by the number of processes.
    """
    world = dist.world_size()
    if cfg.train.ddp_scaling == "linear":
        per_process, base_lr = cfg.train.batch_size, cfg.train.lr * world
    elif cfg.train.batch_size % world:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} does not split over {world} "
            "processes; use a multiple or train.ddp_scaling='linear'"
        )
    else:
        per_process, base_lr = cfg.train.batch_size // world, cfg.train.lr
    optimizer = torch.optim.SGD(
        model.parameters(), lr=base_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    return optimizer, per_process, base_lr


RUN_FILES = ("latest.pth", "best_accuracy_mean.pth", "epoch_*.pth")


def claim_fresh(work_dir: Path, overwrite: bool, log: RunLog) -> None:
    """A new run may start only in a work dir without one's checkpoints (or with ``overwrite``)."""
    found = sorted({p for pattern in RUN_FILES for p in work_dir.glob(pattern)})
    dist.barrier()  # every rank has looked before any file goes
    if not found:
        return
    if not overwrite:
        raise UserError(
            f"work dir '{work_dir}' already holds a run ({', '.join(p.name for p in found[:3])}); "
            "add --auto-resume to continue it, --overwrite to start over (its checkpoints are "
            "deleted), or choose another --work-dir"
        )
    if dist.is_main():
        for p in found:
            p.unlink()
        log.info(f"--overwrite: removed {len(found)} checkpoint(s) of the earlier run in {work_dir}")
    dist.barrier()


def find_resume(work_dir: Path, resume_from: str | Path | None, auto_resume: bool) -> Path | None:
    if resume_from:
        return Path(resume_from)
    latest = work_dir / "latest.pth"
    return latest if auto_resume and latest.is_file() else None


# --------------------------------------------------------------------------- the state


@dataclass
class TrainState:
    """Where a run is; its checkpoint holds exactly :attr:`KEYS` (see ``to_checkpoint``).

    ``epoch``: epochs completed; ``iteration``: iterations done in the next epoch
    (non-zero only for a run stopped mid-epoch). Batches and augmentations are a
    pure function of (seed, epoch, iteration), so these two numbers are the data
    position, and the learning rate is a pure function of them and the config.
    """

    model: FewShotModel
    optimizer: torch.optim.Optimizer
    val_episodes: Tensor  # (episodes, n_way, n_shot + n_query) indices, fixed for the run
    train_classes: list[str]  # the base classes, by name: meta-testing refuses to test on them
    epoch: int = 0
    iteration: int = 0
    best: float | None = None
    best_epoch: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    KEYS = ("model", "config", "train_classes", "epoch", "iteration", "best_score", "best_epoch",
            "optimizer", "rng", "val_episodes", "history")  # fmt: skip

    def to_checkpoint(self, cfg: Config) -> dict[str, Any]:
        values = {
            "model": self.model.state_dict(),
            "config": cfg.to_dict(),  # the resolved config
            "train_classes": self.train_classes,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "best_score": self.best,
            "best_epoch": self.best_epoch,
            "optimizer": self.optimizer.state_dict(),
            "rng": rng_state(),
            "val_episodes": self.val_episodes,
            "history": self.history,
        }
        assert tuple(values) == self.KEYS  # one list of keys, written and read in one place
        return values

    def save(self, path: Path, cfg: Config) -> None:
        if dist.is_main():
            save_checkpoint(path, self.to_checkpoint(cfg))

    def resume(self, path: Path, cfg: Config) -> None:
        ckpt = load_checkpoint(path)
        check_resume_config(cfg, ckpt, path)
        stored = ckpt.get("train_classes")  # absent in checkpoints of earlier versions
        if stored is not None and list(stored) != self.train_classes:
            changed = sorted(set(stored) ^ set(self.train_classes))
            raise ConfigError(
                f"cannot resume from '{path}': the train split's classes are not the ones it was trained "
                f"on (differ: {', '.join(changed[:3]) or 'their order'}); restore the data or start a new run"
            )
        load_model_weights(self.model, ckpt, path, cfg.model.backbone)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.best, self.best_epoch = ckpt["best_score"], ckpt["best_epoch"]
        self.history = list(ckpt["history"])
        self.val_episodes = ckpt["val_episodes"]


def check_resume_config(cfg: Config, ckpt: dict[str, Any], path: Path) -> None:
    old = ckpt.get("config")
    if not old or "iteration" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(
            f"'{path}' has no training state to resume (an imported or exported checkpoint: "
            "weights only; it tests and predicts, but training cannot continue from it)"
        )
    new = cfg.to_dict()
    for section, key in (
        ("model", "backbone"),
        ("model", "head"),
        ("data", "dataset"),
        ("data", "image_size"),
        ("train", "batch_size"),
        ("train", "seed"),
    ):
        if old[section][key] != new[section][key]:
            raise ConfigError(
                f"cannot resume from '{path}': it was trained with {section}.{key}="
                f"{old[section][key]!r}, the config now says {new[section][key]!r}"
            )


# --------------------------------------------------------------------------- one epoch


def train_batches(
    state: TrainState,
    loader: TrainLoader,
    cfg: Config,
    base_lr: float,
    epoch: int,
    show: bool,
) -> Iterator[tuple[Tensor, Tensor, float, float]]:
    """Yield (images, labels, lr, data_time) for the rest of ``epoch``, setting each step's lr."""
    iters = len(loader)
    with progress_bar(
        total=iters, initial=state.iteration, desc=f"epoch {epoch + 1}", unit="it", leave=False, enabled=show
    ) as bar:
        for images, labels, data_time in loader.epoch(epoch, state.iteration):
            lr = lr_at(cfg.train, epoch * iters + state.iteration, epoch, base_lr)
            for group in state.optimizer.param_groups:
                group["lr"] = lr
            yield images, labels, lr, data_time
            bar.update(1)


class Meter:
    """A logging interval's losses and accuracies, kept on the device: the host reads them
    once per ``train.log_interval`` (nanoGPT's pattern), not once per step."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.losses: list[Tensor] = []
        self.accuracies: list[Tensor] = []
        self.data_time = 0.0
        self.t_start = time.perf_counter()

    def add(self, loss: Tensor, accuracy: Tensor, data_time: float) -> None:
        """One step: its loss and batch accuracy (0-d device tensors, fraction), data wait (s)."""
        self.losses.append(loss)
        self.accuracies.append(accuracy)
        self.data_time += data_time

    def check_finite(self, state: TrainState, work_dir: Path) -> list[float]:
        """The interval's losses as numbers (one device sync), or NonFiniteLossError naming the
        first non-finite step; called before anything is written, so no such weights are saved."""
        values = torch.stack(self.losses).float().cpu().tolist() if self.losses else []
        for k, value in enumerate(values):
            if not math.isfinite(value):
                last = work_dir / "latest.pth"
                raise NonFiniteLossError(
                    f"loss is {value} at epoch {state.epoch + 1}, iteration "
                    f"{state.iteration - len(values) + k + 1}; training stopped before writing these "
                    f"weights. Last good checkpoint: {last if last.is_file() else 'none yet'}. "
                    "Lower train.lr or check the data."
                )
        return values

    def means(self, state: TrainState, work_dir: Path) -> dict[str, float]:
        """The interval's mean loss, accuracy (%), step time and data time (s); then a new interval."""
        n = len(self.losses)
        losses = self.check_finite(state, work_dir)
        accuracy = float(torch.stack(self.accuracies).float().mean()) * 100
        now = time.perf_counter()
        out = {"loss": sum(losses) / n, "accuracy": accuracy, "time": (now - self.t_start) / n,
               "data_time": self.data_time / n}  # fmt: skip
        self.reset()
        return out


def log_step(
    log: RunLog,
    meter: Meter,
    state: TrainState,
    cfg: Config,
    epoch: int,
    iters: int,
    lr: float,
    work_dir: Path,
    device: torch.device,
) -> None:
    """Every ``train.log_interval`` iterations (and at the epoch's end): the interval's means and
    the memory high-water mark in MiB (:func:`peak_memory_mib`; ``memory``, as mmcv's logs)."""
    it = state.iteration
    if it % cfg.train.log_interval and it != iters:
        return
    m = meter.means(state, work_dir)
    memory = peak_memory_mib(device)
    log.record(mode="train", epoch=epoch + 1, iter=it, global_iter=epoch * iters + it, lr=lr, loss=m["loss"],
               accuracy=m["accuracy"], time=m["time"], data_time=m["data_time"], memory=memory)  # fmt: skip
    log.info(
        f"Epoch [{epoch + 1}][{it}/{iters}]  lr: {lr:.4e}, time: {m['time']:.3f}, data_time: "
        f"{m['data_time']:.3f}, memory: {memory}, loss: {m['loss']:.4f}, accuracy: {m['accuracy']:.2f}"
    )


# --------------------------------------------------------------------------- after an epoch


def after_epoch(
    state: TrainState,
    cfg: Config,
    rt: Runtime,
    val_split: PackedSplit,
    work_dir: Path,
    log: RunLog,
    show: bool,
    iters: int,
) -> None:
    """Validate when due (and after the last epoch), keep the best, write the epoch's checkpoints."""
    epoch = state.epoch
    if epoch % cfg.val.interval == 0 or epoch == cfg.train.epochs:
        t_val = time.perf_counter()
        result = validate(state.model, val_split, cfg, rt, state.val_episodes, show)
        improved = state.best is None or result.mean > state.best
        if improved:
            state.best, state.best_epoch = result.mean, epoch
        state.history.append({"epoch": epoch, "accuracy_mean": result.mean, "accuracy_ci95": result.ci95})
        log.record(mode="val", epoch=epoch, iter=epoch * iters, accuracy_mean=result.mean,
                   accuracy_ci95=result.ci95, best=state.best, seconds=round(time.perf_counter() - t_val, 2))  # fmt: skip
        log.info(
            f"Epoch(val) [{epoch}]  {result.line()}"
            + ("  (best so far)" if improved else f"  (best {state.best:.2f} at epoch {state.best_epoch})")
        )
        if improved:
            state.save(work_dir / "best_accuracy_mean.pth", cfg)
    if epoch % cfg.train.checkpoint_interval == 0 or epoch == cfg.train.epochs:
        state.save(work_dir / f"epoch_{epoch}.pth", cfg)
    state.save(work_dir / "latest.pth", cfg)


def validate(
    model: FewShotModel, val_split: PackedSplit, cfg: Config, rt: Runtime, episodes: Tensor, progress: bool
) -> MetaTestResult:
    """Meta-test the current backbone on the fixed val episodes (split across ranks).

    Only the images the episodes use are embedded (at most episodes × ways ×
    (shots + queries): 8,000 for 100 1-shot episodes, against 124,261 images in
    tieredImageNet's val split); features are per-image in eval mode, so the
    result is that of embedding the whole split.
    """
    used, local = torch.unique(episodes, return_inverse=True)  # local: episodes re-indexed into used
    feats = extract_features(
        model.backbone, val_split, cfg, rt, progress=progress, desc="val features", indices=used.numpy()
    )
    kill_point("val")
    return meta_test_episodes(feats, local, cfg.val, cfg.finetune, progress, desc="val episodes")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test's thread)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal stops at once

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, device: torch.device) -> bool:
        flag = self.signal is not None
        if dist.world_size() > 1:  # every rank must stop at the same step
            flag = dist.all_reduce_mean(float(flag), device) > 0
        return flag

    def exit(self, log: RunLog, state: TrainState, cfg: Config, work_dir: Path, where: str) -> None:
        """Write ``latest.pth`` at this point and leave with a message saying how to resume."""
        state.save(work_dir / "latest.pth", cfg)
        msg = (
            f"stopped by signal at {where}; wrote {work_dir / 'latest.pth'}. "
            "Resume with the same command plus --auto-resume"
        )
        log.info(msg)
        dist.shutdown()
        raise SystemExit(msg)
