"""Thin helpers over ``torch.distributed`` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

Backend: NCCL when the processes use GPUs, Gloo on CPU. A collective waits at
most ``NEGMARGIN_DIST_TIMEOUT`` seconds (default 1800), so a rank that dies makes
the others fail with a timeout instead of hanging; torchrun then stops the job.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as td

from .errors import UserError


def is_initialized() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_initialized() else 0


def world_size() -> int:
    return td.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (no-op outside torchrun)."""
    if is_initialized() or not launched_by_torchrun():
        return
    timeout = datetime.timedelta(seconds=float(os.environ.get("NEGMARGIN_DIST_TIMEOUT", 1800)))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
        td.init_process_group(backend, timeout=timeout, device_id=device)
    else:
        td.init_process_group(backend, timeout=timeout)


def shutdown() -> None:
    if is_initialized():
        td.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        td.barrier()


def all_gather_object(obj):
    """Every rank's ``obj``, in rank order (a list of length world size)."""
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` under DistributedDataParallel when there are several processes, else itself."""
    if world_size() <= 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def all_reduce_mean(value: float, device: torch.device) -> float:
    if not is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    td.all_reduce(t)
    return float(t.item()) / world_size()


def local_device(requested: str) -> torch.device:
    """The device this process should use: ``auto`` picks CUDA when present (per LOCAL_RANK).

    A device this machine or this torch build lacks, or a malformed name, is a
    UserError naming it (not a torch assertion deep in the first ``.to()``).
    """
    local = int(os.environ.get("LOCAL_RANK", 0))
    if requested == "auto":
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(requested)
    except (RuntimeError, ValueError, TypeError):
        raise UserError(
            f"device '{requested}' is not a device name; expected auto, cpu, cuda or cuda:N"
        ) from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise UserError(f"device '{requested}' is not supported; expected auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(
            f"device '{requested}' was asked for but CUDA is not available here (this torch build: "
            f"{torch.__version__}, torch.cuda.is_available() is False); use --device cpu or auto"
        )
    if dev.index is None:
        dev = torch.device("cuda", local)
    if dev.index >= torch.cuda.device_count():
        raise UserError(
            f"device '{requested}': this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1})"
        )
    return dev
