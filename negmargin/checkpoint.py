"""Self-contained checkpoints, written atomically and loaded without running code.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), loaded
with ``torch.load(..., weights_only=True)``, which refuses any pickled object
that is not data — a file crafted to run code on load is rejected unread.

Keys: ``format`` ("negmargin-checkpoint"), ``format_version``, ``negmargin_version``,
``sha256`` (:func:`content_digest` of the rest, checked on load), then exactly
:attr:`negmargin.train.TrainState.KEYS`: ``train_classes`` (the base classes by name), ``model`` (state dict: ``backbone.*``,
``head.weight``), ``config`` (the resolved config), ``epoch`` (epochs completed),
``iteration`` (iterations done in the next epoch; batches, augmentations and the learning
rate are pure functions of (seed, epoch, iteration), so these two are the whole position),
``best_score``/``best_epoch``, ``optimizer``, ``rng`` (Python, NumPy, torch, CUDA generator
states), ``val_episodes``, ``history``. Checkpoints of earlier versions (with ``backbone``,
``scheduler`` and ``sampler`` keys) load for testing and prediction.

Reference (mmfewshot) checkpoints — ``{"meta": ..., "state_dict": {...}}`` with
``backbone.``/``head.`` keys — can be imported for testing: our module names
are the reference's, so the mapping is the identity on ``backbone.*`` and
``head.weight``; ``meta_test_head.*`` (rebuilt per episode) is dropped.
"""

from __future__ import annotations

import hashlib
import numbers
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ._version import __version__
from .errors import CheckpointError
from .fileio import atomic_save, file_sha256

FORMAT = "negmargin-checkpoint"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Global RNG states as checkpoint-safe data (tensors and plain values only)."""
    py = random.getstate()
    np_state = cast(tuple, np.random.get_state())  # the legacy tuple form
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` to ``path`` atomically (a temporary file renamed over it)."""
    checkpoint = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "negmargin_version": __version__,
        **checkpoint,
    }
    checkpoint["sha256"] = content_digest(checkpoint)
    atomic_save(path, lambda f: torch.save(checkpoint, f))


def content_digest(obj: Any) -> str:
    """sha256 over a checkpoint's content — every tensor's dtype, shape and bytes, every other
    value's repr, in key order — so a file damaged on disk is detected on load (PyTorch's zip
    format does not check its records), whatever part of it the damage hit."""
    h = hashlib.sha256()

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            keys = sorted((k for k in x if k != "sha256"), key=repr)  # the checksum is not its own input
            h.update(f"D{len(keys)}".encode())
            for k in keys:
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        elif isinstance(x, (bool, np.bool_)):
            h.update(repr(bool(x)).encode())
        elif isinstance(x, numbers.Integral):  # NumPy scalars load back as Python numbers
            h.update(repr(int(x)).encode())
        elif isinstance(x, numbers.Real):
            h.update(repr(float(x)).encode())
        else:
            h.update(repr(x).encode())

    walk(obj)
    return h.hexdigest()


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist; check the path "
            "(training writes work_dir/<config name>/best_accuracy_mean.pth)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        offending = next((ln.strip() for ln in lines if "GLOBAL" in ln), None)
        if offending is None:  # not a pickle at all, or a damaged one
            raise CheckpointError(
                f"'{path}' is not a readable PyTorch checkpoint (corrupt, truncated or another kind of file)"
            ) from None
        raise CheckpointError(
            f"refusing to load '{path}': it contains objects other than tensors and plain data, "
            f"which could run code when unpickled ({offending[:160]}); only load files you trust, "
            "and save them with plain state dicts"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError) as exc:
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint (truncated or corrupt?): {str(exc)[:160]}"
        ) from None
    except Exception as exc:  # noqa: BLE001 — any other file makes the unpickler fail its own way
        # (a short text file: IndexError from the weights-only unpickler's stack)
        raise CheckpointError(
            f"'{path}' is not a readable PyTorch checkpoint (another kind of file?): "
            f"{type(exc).__name__}: {str(exc)[:120]}"
        ) from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a negmargin checkpoint, or import a reference (mmfewshot) one. Never runs code."""
    path = Path(path)
    raw = _read(path)
    if isinstance(raw, dict) and raw.get("format") == FORMAT:
        if "sha256" in raw and content_digest(raw) != raw["sha256"]:  # absent in earlier versions' files
            raise CheckpointError(
                f"checkpoint '{path}' is damaged: its content does not match the checksum written with it "
                "(a disk or copy error); use another copy, or an earlier checkpoint of the run"
            )
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(
                f"'{path}' was written by a newer negmargin "
                f"({raw.get('negmargin_version')}); upgrade negmargin"
            )
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        return import_reference(raw, path)
    raise CheckpointError(
        f"'{path}' is not a negmargin checkpoint (no 'format' key) nor an mmfewshot one "
        "(no 'state_dict'); pass a file written by tools/classification/train.py"
    )


# What testing and prediction read; the rest of a training checkpoint (optimizer, RNG state,
# validation episodes) only resumes a run and doubles a Conv4 file's size.
EXPORT_KEYS = ("model", "config", "train_classes", "epoch", "best_score", "best_epoch", "history")


def export_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write ``src``'s weights, config, base classes and history to ``dst`` without its training
    state, for publishing: it tests and predicts exactly as ``src`` (same tensors) but cannot be
    resumed. ``exported_from`` records the source file's name and sha256. Returns what was written."""
    src, dst = Path(src), Path(dst)
    ckpt = load_checkpoint(src)
    if not ckpt.get("config"):
        raise CheckpointError(
            f"'{src}' holds no config (an imported checkpoint?); only train.py's can be exported"
        )
    out = {k: ckpt[k] for k in EXPORT_KEYS if k in ckpt}
    out["exported_from"] = {"file": src.name, "sha256": file_sha256(src)}
    save_checkpoint(dst, out)
    return out


def infer_backbone(state: dict[str, torch.Tensor]) -> str:
    """The backbone of an imported mmfewshot state dict, from its key names (its files carry
    no config; ours always do and are never guessed)."""
    keys = [k for k in state if k.startswith("backbone.")]
    if any(k.startswith("backbone.layer1.0.conv1") for k in keys):
        return "resnet12"
    if any(k.startswith("backbone.layers.0.layers.0") for k in keys):
        return "conv4"
    raise CheckpointError(
        f"cannot tell the backbone from the checkpoint's keys (first keys: {', '.join(list(state)[:4])})"
    )


def stored_backbone(checkpoint: dict[str, Any], path: str | Path) -> str:
    """The backbone a checkpoint was trained with: its config's ``model.backbone``; the
    ``backbone`` key set on import (or by earlier versions); else guessed from key names."""
    config = checkpoint.get("config")
    if isinstance(config, dict):
        name = (config.get("model") or {}).get("backbone")
        if not isinstance(name, str):
            raise CheckpointError(f"checkpoint '{path}' holds a config without model.backbone")
        return name
    return checkpoint.get("backbone") or infer_backbone(checkpoint["model"])


def import_reference(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """An mmfewshot checkpoint as a negmargin one (weights only; no optimizer state)."""
    state = raw["state_dict"]
    model = {
        k: v
        for k, v in state.items()
        if (k.startswith("backbone.") or k == "head.weight") and isinstance(v, torch.Tensor)
    }
    if "head.weight" not in model:
        raise CheckpointError(f"'{path}' has no 'head.weight'; is it a Neg-Margin/Baseline++ checkpoint?")
    backbone = infer_backbone(model)
    meta: dict[str, Any] = raw["meta"] if isinstance(raw.get("meta"), dict) else {}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "imported_from": f"mmfewshot:{path.name}",
        "model": model,
        "config": None,
        "backbone": backbone,
        "num_classes": int(model["head.weight"].shape[0]),
        "feature_dim": int(model["head.weight"].shape[1]),
        "epoch": int(meta.get("epoch", 0) or 0),
        "iteration": int(meta.get("iter", 0) or 0),
        "best_score": None,
    }


def load_model_weights(
    model: torch.nn.Module, checkpoint: dict[str, Any], path: str | Path, expected_backbone: str
) -> None:
    """Load ``checkpoint['model']`` into ``model``, with a clear error on any mismatch.

    The checkpoint's backbone is read from its stored config (``model.backbone``); only a
    file without one (an imported mmfewshot checkpoint) has it guessed from key names.
    """
    found = stored_backbone(checkpoint, path)
    if found != expected_backbone:
        raise CheckpointError(
            f"checkpoint '{path}' holds a {found} backbone but the config says model.backbone="
            f"'{expected_backbone}'; use the config the checkpoint was trained with"
        )
    state = checkpoint["model"]
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        if wrong:
            parts.append(f"shape {', '.join(wrong[:3])}")
        raise CheckpointError(
            f"checkpoint '{path}' does not fit the model built from the config ({'; '.join(parts)}); "
            "check model.backbone, data.channels and data.image_size"
        )
    model.load_state_dict(state)
