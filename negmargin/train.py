"""Base training: the epoch loop, validation, checkpoints, resume.

``run(cfg, work_dir)`` is the whole of ``tools/classification/train.py``. The loop
is plain: batch → backbone → Neg-Margin head → cross-entropy → backward → SGD.
Every 5 epochs (and after the last) the model is meta-tested on 100 fixed val
episodes; ``best_accuracy_mean.pth`` is rewritten whenever that mean strictly
improves. ``latest.pth`` is written after every epoch and when the run is
stopped with SIGTERM/SIGINT, so ``--auto-resume`` continues where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from . import distributed as dist
from .checkpoint import load_checkpoint, load_model_weights, rng_state, save_checkpoint, set_rng_state
from .config import Config, dump_config
from .datasets import load_split
from .episodes import sample_episodes
from .errors import CheckpointError, ConfigError, NonFiniteLossError
from .faults import kill_point
from .fileio import ensure_writable_dir
from .heads import FewShotModel, build_model
from .loader import TrainLoader
from .metatest import MetaTestResult, extract_features, meta_test_episodes
from .runlog import RunLog
from .schedule import lr_at


class Trainee(nn.Module):
    """What DDP wraps: images + labels → (logits with margin, similarities).

    With ``compile=True`` the backbone's forward goes through ``torch.compile``
    while the model's own modules (and so the checkpoint keys) stay unchanged.
    """

    def __init__(
        self, model: FewShotModel, autocast_dtype: torch.dtype | None, compile: bool = False
    ) -> None:
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        # Kept out of the module tree: the compiled wrapper would add "_orig_mod." keys.
        object.__setattr__(self, "_backbone", torch.compile(model.backbone) if compile else model.backbone)

    def forward(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        device_type = images.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            feats = self._backbone(images)
        with torch.autocast(device_type, enabled=False):
            sims = self.model.head.similarity(feats.float())
            return self.model.head.logits(sims, labels), sims


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_precision(cfg: Config, device: torch.device) -> tuple[str, torch.dtype | None]:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return precision, (torch.bfloat16 if precision == "bf16" else None)


def resolve_channels_last(cfg: Config) -> bool:
    # Measured here (bench/train_speed.py): channels-last is faster or equal for
    # Conv4/ResNet12 on this CPU in fp32 and bf16, and the usual choice on GPUs.
    return cfg.train.channels_last != "off"


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread (e.g. a test's thread)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal stops at once

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self, device: torch.device) -> bool:
        flag = self.signal is not None
        if dist.world_size() > 1:  # every rank must stop at the same step
            flag = dist.all_reduce_mean(float(flag), device) > 0
        return flag


def validate(
    model: FewShotModel,
    val_split,
    cfg: Config,
    device,
    episodes: Tensor,
    autocast_dtype,
    channels_last: bool,
    progress: bool,
) -> MetaTestResult:
    """Meta-test the current backbone on the fixed val episodes (split across ranks).

    Only the images the episodes use are embedded (at most episodes × ways ×
    (shots + queries): 8,000 for 100 1-shot episodes, against 124,261 images in
    tieredImageNet's val split); features are per-image in eval mode, so the
    result is that of embedding the whole split.
    """
    used, local = torch.unique(episodes, return_inverse=True)  # local: episodes re-indexed into used
    feats = extract_features(
        model.backbone,
        val_split,
        cfg,
        device,
        autocast_dtype,
        channels_last,
        progress=progress,
        desc="val features",
        indices=used.numpy(),
    )
    kill_point("val")
    return meta_test_episodes(feats, local, cfg.val, cfg.finetune, progress, desc="val episodes")


def _check_resume_config(cfg: Config, ckpt: dict, path: Path) -> None:
    old = ckpt.get("config")
    if not old:
        raise CheckpointError(f"'{path}' has no training state to resume (an imported checkpoint?)")
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


def run(
    cfg: Config,
    work_dir: str | Path,
    resume_from: str | Path | None = None,
    auto_resume: bool = False,
    progress: bool = True,
) -> dict:
    """Train, validate and checkpoint; returns a summary dict."""
    work_dir = Path(work_dir)
    device = dist.local_device(cfg.train.device)
    dist.init(device)
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0
    if main:
        ensure_writable_dir(work_dir)
    dist.barrier()
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    log = RunLog(work_dir, enabled=main)
    show = progress and main

    # Data: the main process prepares the caches, the others then open them.
    def splits():
        return load_split(cfg, "train", progress=show, log=log.info), load_split(
            cfg, "val", progress=show, log=log.info
        )

    if main:
        train_split, val_split = splits()
    dist.barrier()
    if not main:
        train_split, val_split = splits()

    num_classes = cfg.model.num_classes or train_split.num_classes
    if num_classes < train_split.num_classes:
        raise ConfigError(
            f"model.num_classes={num_classes} but the train split has {train_split.num_classes} "
            "classes; raise it or set it to None (take it from the data)"
        )
    val_episodes = sample_episodes(
        val_split.labels,
        cfg.val.n_way,
        cfg.val.n_shot,
        cfg.val.n_query,
        cfg.val.n_episodes,
        cfg.val.episode_seed,
        val_split.class_names,
        where="val split",
    )

    model = build_model(cfg, num_classes).to(device)
    precision, autocast_dtype = resolve_precision(cfg, device)
    channels_last = resolve_channels_last(cfg)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.sync_bn and world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    if cfg.train.ddp_scaling == "linear":
        per_process, base_lr = cfg.train.batch_size, cfg.train.lr * world
    else:
        if cfg.train.batch_size % world:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} does not split over {world} "
                "processes; use a multiple or train.ddp_scaling='linear'"
            )
        per_process, base_lr = cfg.train.batch_size // world, cfg.train.lr
    optimizer = torch.optim.SGD(
        model.parameters(), lr=base_lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    trainee: nn.Module = Trainee(model, autocast_dtype, compile=cfg.train.compile)
    if world > 1:
        trainee = nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None
        )
    loader = TrainLoader(train_split, cfg, per_process, device, rank, world, channels_last)
    iters = len(loader)

    start_epoch, start_iter, best, best_epoch, history = 0, 0, None, None, []
    resume_path = Path(resume_from) if resume_from else None
    if resume_path is None and auto_resume and (work_dir / "latest.pth").is_file():
        resume_path = work_dir / "latest.pth"
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path)
        _check_resume_config(cfg, ckpt, resume_path)
        load_model_weights(model, ckpt, resume_path, cfg.model.backbone)
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_epoch, start_iter = ckpt["sampler"]["epoch"], ckpt["sampler"]["iteration"]
        best, best_epoch = ckpt.get("best_score"), ckpt.get("best_epoch")
        history = list(ckpt.get("history", []))
        val_episodes = ckpt.get("val_episodes", val_episodes)
        log.info(f"resumed from {resume_path} at epoch {start_epoch + 1}, iteration {start_iter}")

    def checkpoint(epoch_pos: int, iter_pos: int) -> dict:
        return {
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "backbone": cfg.model.backbone,
            "num_classes": num_classes,
            "feature_dim": model.num_features,
            "epoch": epoch_pos,
            "iteration": epoch_pos * iters + iter_pos,
            "best_score": best,
            "best_epoch": best_epoch,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"iteration": epoch_pos * iters + iter_pos, "base_lr": base_lr},
            "sampler": {"epoch": epoch_pos, "iteration": iter_pos, "seed": cfg.train.seed},
            "rng": rng_state(),
            "val_episodes": val_episodes,
            "history": history,
        }

    if main:
        dump_config(cfg, work_dir / f"{cfg.name}.py")
        log.info(
            f"work dir {work_dir}; device {device} × {world}; precision {precision}; "
            f"channels_last {channels_last}; {num_classes} head classes; "
            f"{iters} iterations/epoch of {per_process} images per process"
        )
    t_start = time.time()
    epoch_bar = tqdm(
        range(start_epoch, cfg.train.epochs),
        desc="epochs",
        unit="epoch",
        initial=start_epoch,
        total=cfg.train.epochs,
        disable=not show,
        dynamic_ncols=True,
    )
    with StopRequest() as stop:
        for epoch in epoch_bar:
            trainee.train()
            meters = {"loss": 0.0, "acc": 0.0, "time": 0.0, "data": 0.0, "n": 0}
            t_last = time.perf_counter()
            bar = tqdm(
                total=iters,
                initial=start_iter,
                desc=f"epoch {epoch + 1}",
                unit="it",
                leave=False,
                disable=not show,
                dynamic_ncols=True,
            )
            for it, (images, labels, data_time) in enumerate(
                loader.epoch(epoch, start_iter), start=start_iter
            ):
                global_it = epoch * iters + it
                lr = lr_at(cfg.train, global_it, epoch, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits, sims = trainee(images, labels)
                loss = F.cross_entropy(logits, labels)
                loss_value = float(loss.item())
                if not math.isfinite(loss_value):
                    last = work_dir / "latest.pth"
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at epoch {epoch + 1}, iteration {it + 1} (global "
                        f"{global_it + 1}); training stopped before writing these weights. Last good "
                        f"checkpoint: {last if last.is_file() else 'none yet'}. Lower train.lr or check the data."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                kill_point(f"iter:{global_it + 1}")
                now = time.perf_counter()
                meters["loss"] += loss_value
                meters["acc"] += float((sims.argmax(1) == labels).float().mean()) * 100
                meters["time"] += now - t_last
                meters["data"] += data_time
                meters["n"] += 1
                t_last = now
                bar.update(1)
                if (it + 1) % cfg.train.log_interval == 0 or it + 1 == iters:
                    n = meters["n"]
                    record = {
                        "mode": "train",
                        "epoch": epoch + 1,
                        "iter": it + 1,
                        "global_iter": global_it + 1,
                        "lr": lr,
                        "loss": meters["loss"] / n,
                        "accuracy": meters["acc"] / n,
                        "time": meters["time"] / n,
                        "data_time": meters["data"] / n,
                    }
                    log.record(**record)
                    log.info(
                        f"Epoch [{epoch + 1}][{it + 1}/{iters}]  lr: {lr:.4e}, "
                        f"time: {record['time']:.3f}, data_time: {record['data_time']:.3f}, "
                        f"loss: {record['loss']:.4f}, accuracy: {record['accuracy']:.2f}"
                    )
                    meters = {"loss": 0.0, "acc": 0.0, "time": 0.0, "data": 0.0, "n": 0}
                if stop.requested(device):
                    bar.close()
                    if main:
                        save_checkpoint(work_dir / "latest.pth", checkpoint(epoch, it + 1))
                    msg = (
                        f"stopped by signal at epoch {epoch + 1}, iteration {it + 1}; wrote "
                        f"{work_dir / 'latest.pth'}. Resume with the same command plus --auto-resume"
                    )
                    log.info(msg)
                    dist.shutdown()
                    raise SystemExit(msg)
            bar.close()
            start_iter = 0

            last_epoch = epoch + 1 == cfg.train.epochs
            if (epoch + 1) % cfg.val.interval == 0 or last_epoch:
                t_val = time.perf_counter()
                result = validate(
                    model, val_split, cfg, device, val_episodes, autocast_dtype, channels_last, show
                )
                val_seconds = time.perf_counter() - t_val
                improved = best is None or result.mean > best
                if improved:
                    best, best_epoch = result.mean, epoch + 1
                history.append(
                    {"epoch": epoch + 1, "accuracy_mean": result.mean, "accuracy_ci95": result.ci95}
                )
                log.record(
                    mode="val",
                    epoch=epoch + 1,
                    iter=(epoch + 1) * iters,
                    accuracy_mean=result.mean,
                    accuracy_ci95=result.ci95,
                    best=best,
                    seconds=round(val_seconds, 2),
                )
                log.info(
                    f"Epoch(val) [{epoch + 1}]  {result.line()}"
                    + ("  (best so far)" if improved else f"  (best {best:.2f} at epoch {best_epoch})")
                )
                if improved and main:
                    save_checkpoint(work_dir / "best_accuracy_mean.pth", checkpoint(epoch + 1, 0))
            if main and ((epoch + 1) % cfg.train.checkpoint_interval == 0 or last_epoch):
                save_checkpoint(work_dir / f"epoch_{epoch + 1}.pth", checkpoint(epoch + 1, 0))
            if main:
                save_checkpoint(work_dir / "latest.pth", checkpoint(epoch + 1, 0))
            if stop.requested(device):
                msg = (
                    f"stopped by signal after epoch {epoch + 1}; resume with the same command "
                    "plus --auto-resume"
                )
                log.info(msg)
                dist.shutdown()
                raise SystemExit(msg)
    epoch_bar.close()
    summary = {
        "work_dir": str(work_dir),
        "best_accuracy_mean": best,
        "best_epoch": best_epoch,
        "best_checkpoint": str(work_dir / "best_accuracy_mean.pth"),
        "train_seconds": round(time.time() - t_start, 1),
        "history": history,
    }
    if main and best is not None:
        log.info(
            f"done: best val accuracy {best:.2f} at epoch {best_epoch}; "
            f"checkpoint {work_dir / 'best_accuracy_mean.pth'}"
        )
    dist.barrier()
    return summary


def work_dir_for(cfg: Config, override: str | Path | None) -> Path:
    """``work_dir/<config name>`` by default (the seed README's layout)."""
    return Path(override) if override else Path("work_dir") / cfg.name


def with_overrides(cfg: Config, seed: int | None, deterministic: bool, data_root: str | None) -> Config:
    train = cfg.train
    if seed is not None:
        train = replace(train, seed=seed)
    if deterministic:
        train = replace(train, deterministic=True)
    data = replace(cfg.data, root=data_root) if data_root else cfg.data
    return replace(cfg, train=train, data=data).validate()
