"""Batch norm fused with what follows it in a block, for training on a CPU.

``norm_act(x, bn, act, pool=..., shortcut=...)`` computes, in training mode,

    maxpool2(act(bn(x) + shortcut_bn(shortcut_x)))      (shortcut and pooling optional)

in one C++ kernel for the forward pass and one for the backward (``csrc/fused_norm.cpp``),
where ATen runs batch norm, the add, the activation and the pooling as separate passes
over full-size activations, and autograd keeps each one's output. The kernel is built
once per machine the first time it is used (``torch.utils.cpp_extension``: a C++
compiler and ninja; ~25 s, then cached under ``$TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``) and serves channels-last float32 / bfloat16 CPU tensors.

Results are the same computation, not the same bits as ATen's: batch statistics are
one-pass sums in float32 over fixed chunks of rows, added in float64, and the
activation is applied before rounding to bfloat16 once instead of after each op.
They are the same for any thread count. ``train.fused_norm=True`` turns it on; the
checks against a float64 reference are in ``tests/test_fused_norm.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .cpu import cpu_info

SOURCE = Path(__file__).resolve().parent / "csrc" / "fused_norm.cpp"
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2}


class KernelUnavailable(RuntimeError):
    """The fused kernel could not be built or loaded here (the message says why)."""


@functools.cache
def _ops() -> Any:
    """Build (once per machine, then from the cache) and load the kernel; its ``torch.ops`` namespace."""
    from torch.utils import cpp_extension

    # -march=native: the build is for this CPU, so its name carries the CPU's model and flags
    # (a cache directory shared between machines keeps one build per kind of CPU).
    # NEGMARGIN_KERNEL_MARCH sets another target, e.g. x86-64-v3 (AVX2) for mixed clusters.
    march = os.environ.get("NEGMARGIN_KERNEL_MARCH", "native")
    model, flags = cpu_info()
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), torch.__version__, march, model, " ".join(sorted(flags))]).encode()
    ).hexdigest()[:12]
    try:
        cpp_extension.load(
            name=f"negmargin_fused_{key}",
            sources=[str(SOURCE)],
            # C++20 (template lambdas): what torch 2.13 builds with; older releases default to C++17.
            extra_cflags=["-O3", f"-march={march}", "-fopenmp", "-std=c++20", "-w"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=bool(os.environ.get("NEGMARGIN_VERBOSE_BUILD")),
        )
    except Exception as e:  # a missing compiler or ninja, a compile error: all mean "not here"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KernelUnavailable(
            f"could not build the fused batch-norm kernel ({SOURCE.name}): {first} "
            "(it needs a C++ compiler and the ninja package; set NEGMARGIN_VERBOSE_BUILD=1 to see the build)"
        ) from e
    return torch.ops.negmargin_fused


def load() -> None:
    """Build or load the kernel now; raises :class:`KernelUnavailable` with the reason."""
    _ops()


def enable(backbone: nn.Module, device: torch.device) -> tuple[bool, str]:
    """Train ``backbone``'s blocks through the kernel where it can run: (used, a line for the log).

    On a CUDA device, with SyncBatchNorm, or where the kernel cannot be built, the blocks keep
    ATen's layers and the line says why.
    """
    if device.type != "cpu":
        return False, f"train.fused_norm: a CPU kernel, not used on {device}; ATen's batch norm"
    if any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules()):
        return False, "train.fused_norm: not with train.sync_bn (SyncBatchNorm); ATen's batch norm"
    try:
        load()
    except KernelUnavailable as e:
        return False, f"train.fused_norm: {e}; training with ATen's batch norm"
    backbone.fuse_norms(True)  # type: ignore[operator]
    return True, f"train.fused_norm: batch norm fused with activation and pooling ({SOURCE.name})"


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x1, w1, b1, x2, w2, b2, eps, act, slope, pool):
        y, st1, st2, idx = _ops().forward(x1, w1, b1, x2, w2, b2, eps, act, slope, pool)
        two = x2 is not None
        # The pooling's argmax (bytes) is kept so the backward need not recompute it.
        ctx.options = (act, slope, pool)
        ctx.save_for_backward(x1, w1, b1, st1, x2, w2, b2, st2 if two else None, idx if pool else None)
        ctx.mark_non_differentiable(st1, st2)
        return y, st1, st2 if two else None

    @staticmethod
    def backward(ctx, dy, *_):
        x1, w1, b1, st1, x2, w2, b2, st2, idx = ctx.saved_tensors
        dy = dy.contiguous(memory_format=torch.channels_last)
        grads = _ops().backward(dy, x1, w1, b1, st1, x2, w2, b2, st2, idx, *ctx.options)
        if x2 is None:
            return grads[0], grads[1], grads[2], None, None, None, None, None, None, None
        return (*grads, None, None, None, None)


def supports(x: Tensor, *norms: nn.Module) -> bool:
    """Whether ``x`` and these norm layers can take the fused path (else use ATen's)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and all(
            type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.track_running_stats
            for bn in norms
        )
    )


def _update_running_stats(bn: nn.BatchNorm2d, stats: Tensor, count: int) -> None:
    """What ``nn.BatchNorm2d`` does in training; ``stats`` rows: mean, biased variance, 1/std."""
    assert bn.running_mean is not None and bn.running_var is not None
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    momentum = (
        1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    )  # None: cumulative average, as PyTorch's
    with torch.no_grad():
        unbiased = stats[1] * (count / (count - 1))
        bn.running_mean.copy_(momentum * stats[0] + (1 - momentum) * bn.running_mean)
        bn.running_var.copy_(momentum * unbiased + (1 - momentum) * bn.running_var)


def norm_act(
    x: Tensor,
    bn: nn.BatchNorm2d,
    act: str = "identity",
    slope: float = 0.0,
    pool: bool = False,
    shortcut: tuple[Tensor, nn.BatchNorm2d] | None = None,
) -> Tensor:
    """``maxpool2(act(bn(x) [+ bn2(x2)]))`` in training mode, fused; updates the running stats.

    x (and the shortcut's x2): (N, C, H, W) channels-last, float32 or bfloat16, on the CPU
    (:func:`supports`); act: a key of :data:`ACTIVATIONS` (``slope`` for ``leaky_relu``);
    pool: 2×2 max pooling, stride 2, floor → (N, C, H//2, W//2); else (N, C, H, W).
    """
    x2, bn2 = shortcut if shortcut is not None else (None, None)
    if bn2 is not None and bn2.eps != bn.eps:
        raise ValueError(f"norm_act: the shortcut's batch norm eps {bn2.eps} differs from {bn.eps}")
    # Under autocast the affine parameters stay float32, as ATen's batch norm takes them.
    y, st1, st2 = _FusedNorm.apply(
        x, bn.weight, bn.bias, x2,
        None if bn2 is None else bn2.weight, None if bn2 is None else bn2.bias,
        bn.eps, ACTIVATIONS[act], slope, pool,
    )  # fmt: skip
    count = x.numel() // x.size(1)
    _update_running_stats(bn, st1, count)
    if bn2 is not None:
        _update_running_stats(bn2, st2, count)
    return y
