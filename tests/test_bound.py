"""The arithmetic bound that bench/train_speed.py reports (bench/bound.py): peak FLOP/s from the
CPU's flags, and the FLOP of a training step counted against the convolutions' arithmetic."""

import sys

import pytest
import torch

from negmargin.config import Config
from negmargin.model import build_model

from .helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
from bound import flop_per_cycle, peak_flops, training_flops_per_image  # noqa: E402
from train_speed import activation_before_pool  # noqa: E402

AVX2 = frozenset({"sse2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2 | {"avx512f", "avx512_bf16"}
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile"}


@pytest.mark.parametrize(
    "flags, fp32, bf16",
    [
        (AVX2, 32, 32),
        (AVX512_BF16, 64, 128),
        (AMX, 64, 1024),
        (frozenset({"sse2"}), 8, 8),
        (frozenset(), 2, 2),
    ],
)
def test_flop_per_cycle_follows_the_flags(flags, fp32, bf16):
    # bf16 without a bf16 instruction set is emulated: its bound is fp32's
    assert flop_per_cycle(flags, "fp32")[0] == fp32
    assert flop_per_cycle(flags, "bf16")[0] == bf16


def test_peak_flops_is_cores_times_clock_times_flop_per_cycle():
    peak, text = peak_flops(AVX2, "fp32", 2, 2.45)
    assert peak == pytest.approx(2 * 2.45e9 * 32)
    assert "2 cores × 2.45 GHz × 32 FLOP/cycle" in text and "157 GFLOP/s" in text


def test_conv4_training_flop_is_three_forward_passes_less_the_first_input_gradient():
    model = build_model(Config.from_dict({"model": {"backbone": "conv4"}}).validate(), 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # forward multiply-adds of the four 3×3 convolutions at 84, 42, 21, 10 pixels
    macs = [s * s * cin * 64 * 9 for s, cin in ((84, 3), (42, 64), (21, 64), (10, 64))]
    expected = 2 * (
        3 * sum(macs) - macs[0]
    )  # backward = input + weight gradients; no input grad for the image
    counted = training_flops_per_image(model, 84, 64)
    assert counted == pytest.approx(expected, rel=0.01)  # the head adds ~0.1%
    assert all(v.equal(before[k]) for k, v in model.state_dict().items())  # counted on a copy


def test_train_speed_before_variant_is_the_reference_order_with_the_same_results():
    # bench/train_speed.py's "before" column times Conv4 as it was before pooling moved
    # ahead of the ReLU: that model must have the old order and give the same numbers.
    cfg = Config.from_dict({"name": "t", "data": {"dataset": "folder", "root": "x"}}).validate()
    torch.manual_seed(0)
    now = build_model(cfg, 5)
    before = build_model(cfg, 5)
    before.load_state_dict(now.state_dict())
    activation_before_pool(before)
    kinds = [type(m).__name__ for m in before.backbone.layers[0].layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert [type(m).__name__ for m in now.backbone.layers[0].layers][2:] == ["MaxPool2d", "ReLU"]
    x = torch.randn(4, 3, 84, 84)
    assert torch.equal(now.backbone(x), before.backbone(x))
