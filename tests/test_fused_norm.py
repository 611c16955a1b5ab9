"""The fused batch-norm kernel (negmargin/fused_norm.py, csrc/fused_norm.cpp) against a
float64 reference made of ATen's layers, and the backbones trained through it.

The kernel is built on first use (a C++ compiler and ninja); where there is no compiler
these tests skip, and training falls back to ATen's layers (tested here with the build
mocked to fail).
"""

from __future__ import annotations

import os
import shutil
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from negmargin import fused_norm
from negmargin.backbones import build_backbone
from negmargin.testing import tiny_raw

from .helpers import REPO, run_cli, write_config


@pytest.fixture(scope="module")
def kernel() -> None:
    """The kernel, built; skips only where there is no C++ compiler (a build error fails)."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the fused kernel")
    fused_norm.load()


def reference(x1, bn1, act, slope, pool, x2=None, bn2=None):
    """The unfused layers in float64: batch norm (training) [+ batch norm], activation, pool.

    Pooling compares the activation as stored (rounded to the input's dtype, first of equal
    values), as ATen's pooling does after its own layers; the rounding passes gradients through.
    """

    def norm(x, bn):
        return F.batch_norm(x.double(), None, None, bn.weight.double(), bn.bias.double(), True, 0.0, bn.eps)

    z = norm(x1, bn1) + (norm(x2, bn2) if x2 is not None else 0)
    y = {"identity": z, "relu": F.relu(z), "leaky_relu": F.leaky_relu(z, slope)}[act]
    if not pool:
        return y
    stored = y + (y.to(x1.dtype).double() - y).detach()
    return F.max_pool2d(stored, 2)


def channels_last(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()


def make_norm(c: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.weight[0] = -bn.weight[0]  # a negative scale flips which input is the max
        bn.bias.copy_(torch.randn(c, generator=gen))
    return bn


# C = 64: the vector path only; C = 40: vectors and a scalar tail (32 or 16 channels a step).
# H, W odd: pooling leaves a last row and column outside every window.
@pytest.mark.parametrize("shape", [(4, 64, 6, 8), (3, 40, 7, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "act, two, pool",
    [("identity", False, False), ("relu", False, True), ("leaky_relu", False, False),
     ("leaky_relu", True, True), ("identity", True, False)],
)  # fmt: skip
def test_fused_matches_float64_reference(kernel, shape, dtype, act, two, pool) -> None:
    gen = torch.Generator().manual_seed(1)
    c = shape[1]
    x1 = channels_last(torch.randn(shape, generator=gen) * 3 + 1, dtype)
    x2 = channels_last(torch.randn(shape, generator=gen), dtype) if two else None
    bn1, bn2 = make_norm(c, gen), make_norm(c, gen) if two else None
    out_shape = (shape[0], c, shape[2] // 2, shape[3] // 2) if pool else shape
    dy = torch.randn(out_shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)

    y = fused_norm.norm_act(x1, bn1, act, 0.1, pool, (x2, bn2) if two else None)
    assert y.shape == out_shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.backward(dy)
    got = [x1.grad, bn1.weight.grad, bn1.bias.grad] + (
        [x2.grad, bn2.weight.grad, bn2.bias.grad] if two else []
    )

    leaves = [x1, bn1.weight, bn1.bias] + ([x2, bn2.weight, bn2.bias] if two else [])
    for t in leaves:
        t.grad = None
    ref = reference(x1, bn1, act, 0.1, pool, x2, bn2)
    ref.backward(dy.double())
    want = [t.grad for t in leaves]

    # float32: a few ulps of the sums; bfloat16: the inputs' and outputs' rounding (8 bits).
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    scale = ref.abs().max().item()
    assert (y.double() - ref).abs().max().item() <= tol * scale
    for g, w in zip(got, want):
        assert g is not None and w is not None
        assert (g.double() - w.double()).abs().max().item() <= tol * w.abs().max().item() + 1e-6


def test_running_stats_follow_batchnorm2d(kernel) -> None:
    gen = torch.Generator().manual_seed(2)
    x = channels_last(torch.randn(8, 24, 5, 6, generator=gen) * 2 + 3, torch.float32)
    ours, theirs = make_norm(24, gen), nn.BatchNorm2d(24)
    theirs.load_state_dict(ours.state_dict())
    for _ in range(3):
        fused_norm.norm_act(x, ours, "relu")
        theirs(x)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    assert torch.allclose(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_same_bits_for_any_thread_count(kernel) -> None:
    gen = torch.Generator().manual_seed(3)
    x1 = channels_last(torch.randn(16, 64, 12, 12, generator=gen), torch.bfloat16)
    x2 = channels_last(torch.randn(16, 64, 12, 12, generator=gen), torch.bfloat16)
    dy = (
        torch.randn(16, 64, 6, 6, generator=gen)
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last)
    )
    bn1, bn2 = make_norm(64, gen), make_norm(64, gen)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            for t in (x1, x2, bn1.weight, bn2.weight):
                t.grad = None
            y = fused_norm.norm_act(x1, bn1, "leaky_relu", 0.1, True, (x2, bn2))
            y.backward(dy)
            results.append([y, x1.grad, x2.grad, bn1.weight.grad, bn2.weight.grad])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_bad_input_names_what_was_expected(kernel) -> None:
    bn = nn.BatchNorm2d(8)
    x = torch.randn(2, 8, 4, 4)  # contiguous, not channels-last
    with pytest.raises(RuntimeError, match="x1: expected channels-last memory"):
        fused_norm.norm_act(x, bn, "relu")
    assert not fused_norm.supports(x, bn)
    assert fused_norm.supports(x.contiguous(memory_format=torch.channels_last), bn)
    assert not fused_norm.supports(x.contiguous(memory_format=torch.channels_last), bn.eval())


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_backbone_trains_the_same_through_the_kernel(kernel, name) -> None:
    """Three SGD steps from the same start, fused and not: losses and weights agree to float32
    precision; evaluation (running statistics) takes ATen's layers either way."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(6) % 3

    def train(fuse: bool):
        torch.manual_seed(0)
        net = build_backbone(name, image_size=32).to(memory_format=torch.channels_last)
        head = nn.Linear(net.num_features, 3)
        net.fuse_norms(fuse)
        opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.01, momentum=0.9)
        losses = []
        for _ in range(3):
            opt.zero_grad()
            loss = F.cross_entropy(head(net(x)), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        net.eval()
        with torch.no_grad():
            feats = net(x)
        return losses, net.state_dict(), feats

    l0, s0, f0 = train(False)
    l1, s1, f1 = train(True)
    assert l0 == pytest.approx(l1, rel=1e-4, abs=1e-5)
    for k in s0:
        assert torch.allclose(s0[k].double(), s1[k].double(), rtol=1e-3, atol=1e-4), k
    assert torch.allclose(f0, f1, rtol=1e-3, atol=1e-3)
    assert (
        int(
            s1[
                "layers.0.layers.1.num_batches_tracked"
                if name == "conv4"
                else "layer1.0.norm1.num_batches_tracked"
            ]
        )
        == 3
    )


@pytest.mark.multiprocess
def test_training_run_with_the_kernel_resumes_bit_exactly(kernel, tiny_root, tmp_path) -> None:
    """train.py with train.fused_norm=True: the log says the kernel runs, and a run killed
    mid-epoch and resumed ends with the same bits as one uninterrupted run."""
    raw = tiny_raw(
        tiny_root, tmp_path / "cache",
        train={"epochs": 2, "log_interval": 1, "fused_norm": True}, val={"interval": 1},
    )  # fmt: skip
    config = write_config(tmp_path / "tiny.py", raw)
    args = [str(REPO / "tools/classification/train.py"), str(config), "--deterministic", "--quiet"]
    whole = run_cli([*args, "--work-dir", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    log = next((tmp_path / "whole").glob("*[0-9].log")).read_text()
    assert "train.fused_norm: batch norm fused with activation and pooling" in log

    parts = [*args, "--work-dir", str(tmp_path / "parts")]
    killed = run_cli(parts, env={"NEGMARGIN_KILL_AT": "iter:7"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = run_cli([*parts, "--auto-resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "latest.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "parts" / "latest.pth", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_without_the_kernel_training_keeps_atens_layers(monkeypatch) -> None:
    def fail() -> None:
        raise fused_norm.KernelUnavailable("could not build the fused batch-norm kernel: no compiler")

    monkeypatch.setattr(fused_norm, "load", fail)
    net = build_backbone("conv4", image_size=32)
    used, note = fused_norm.enable(net, torch.device("cpu"))
    assert not used and "no compiler" in note and "ATen's batch norm" in note
    assert not any(getattr(m, "fuse_norm", False) for m in net.modules())
    used, note = fused_norm.enable(net, torch.device("cuda"))
    assert not used and "not used on cuda" in note
    used, note = fused_norm.enable(nn.SyncBatchNorm.convert_sync_batchnorm(net), torch.device("cpu"))
    assert not used and "sync_bn" in note


@pytest.mark.parametrize("name", ["conv4", "resnet12"])
def test_inputs_the_kernel_does_not_take_run_atens_layers_bit_for_bit(name) -> None:
    """fuse_norms(True) with contiguous (not channels-last) activations: ATen's layers, the
    same bits as a backbone that never asked for the kernel (no build needed)."""
    x = torch.randn(4, 3, 32, 32)

    def step(fuse: bool):
        torch.manual_seed(0)
        net = build_backbone(name, image_size=32)
        net.fuse_norms(fuse)
        out = net(x)
        out.square().sum().backward()
        return out, [p.grad for p in net.parameters()]

    (a, ga), (b, gb) = step(False), step(True)
    assert torch.equal(a, b) and all(torch.equal(u, v) for u, v in zip(ga, gb))
