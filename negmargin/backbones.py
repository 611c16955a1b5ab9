"""Feature extractors. Each returns flat features ``(B, num_features)``.

Module names follow the reference implementation (mmfewshot's ``ConvNet`` and
``ResNet12``), so a reference ``state_dict`` maps onto these modules key for key.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor, nn

from . import fused_norm
from .errors import ConfigError


def _init_weights(module: nn.Module) -> None:
    # Reference init: kaiming_normal(fan_out) for convs, BN weight 1 / bias 0;
    # conv biases keep PyTorch's default.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """An image → flat feature extractor: ``forward`` maps (B, C, H, W) to (B, num_features)."""

    num_features: int

    def fuse_norms(self, on: bool = True) -> None:
        """Train the blocks' batch norms through :mod:`negmargin.fused_norm` (CPU,
        channels-last; other inputs, and evaluation, keep ATen's layers)."""
        for m in self.modules():
            if isinstance(m, (ConvBlock, BasicBlock)):
                m.fuse_norm = on


class ConvBlock(nn.Module):
    """Conv3×3 (bias) → BatchNorm → ReLU → MaxPool 2, computed as … → MaxPool 2 → ReLU.

    The two orders give bit-identical outputs and gradients: ReLU is monotone, so the
    window's maximum and its argmax (where max pooling sends the gradient) are the same
    either way, and where the maximum is ≤ 0 both orders pass a zero gradient. Pooling
    first runs the ReLU and its backward on a quarter of the elements: ×1.12 on a
    Conv4 training step (×1.08 with the input path) on a 2-core AVX2 CPU
    (docs/benchmarks.md); ``tests/test_models.py`` trains both orders and checks every
    weight is equal.
    """

    fuse_norm = False  # Backbone.fuse_norms

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Indices 0 and 1 hold the parameters, so state_dict keys are the reference's.
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.MaxPool2d(2),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        if not (self.fuse_norm and self.training):
            return self.layers(x)
        x = self.layers[0](x)
        if fused_norm.supports(x, self.layers[1]):  # = ReLU after pooling, as the layers do
            return fused_norm.norm_act(x, cast(nn.BatchNorm2d, self.layers[1]), "relu", pool=True)
        return self.layers[1:](x)


class Conv4(Backbone):
    """Four 64-channel conv blocks; (B, C, 84, 84) → (B, 64·5·5 = 1600).

    At 28×28 (Omniglot) the output is (B, 64·1·1 = 64).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 84) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[ConvBlock(in_channels if i == 0 else 64, 64) for i in range(4)])
        side = image_size
        for _ in range(4):
            side //= 2
        self.num_features = 64 * side * side
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x).flatten(1)


class BasicBlock(nn.Module):
    """3 × (Conv3×3 no bias → BN → LeakyReLU 0.1), no activation before the add;
    1×1 conv + BN shortcut; LeakyReLU after the add; MaxPool 2."""

    fuse_norm = False  # Backbone.fuse_norms

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.LeakyReLU(0.1)
        self.max_pool = nn.MaxPool2d(2)
        self.downsample = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.conv1(x)
        norms = (self.norm1, self.norm2, self.norm3, self.downsample[1])
        if self.fuse_norm and self.training and fused_norm.supports(out, *norms):
            return self._fused_forward(x, out)
        out = self.relu(self.norm1(out))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        # Not reordered like ConvBlock's ReLU: in floating point x·0.1 can round two
        # distinct negative values of a window to one, so the activation-first argmax
        # (the reference's gradient route) can differ; measured in tests/test_models.py.
        # The saving would be small here, where convolutions take nearly all the time.
        out = self.relu(out + self.downsample(x))
        return self.max_pool(out)

    def _fused_forward(self, x: Tensor, out: Tensor) -> Tensor:
        """The training forward with each batch norm fused with what follows it; out = conv1(x)."""
        slope = self.relu.negative_slope
        out = fused_norm.norm_act(out, self.norm1, "leaky_relu", slope)
        out = fused_norm.norm_act(self.conv2(out), self.norm2, "leaky_relu", slope)
        shortcut = (self.downsample[0](x), cast(nn.BatchNorm2d, self.downsample[1]))
        return fused_norm.norm_act(
            self.conv3(out), self.norm3, "leaky_relu", slope, pool=True, shortcut=shortcut
        )


class ResNet12(Backbone):
    """Blocks of 64-160-320-640 channels, global average pool; (B, C, 84, 84) → (B, 640).

    DropBlock exists in the reference code but its rate is 0 in every Neg-Margin
    config, so it is not built here.
    """

    def __init__(self, in_channels: int = 3, image_size: int = 84) -> None:
        super().__init__()
        widths = (64, 160, 320, 640)
        ins = (in_channels, *widths[:-1])
        for i, (cin, cout) in enumerate(zip(ins, widths), start=1):
            # nn.Sequential of one block keeps the reference's "layerK.0." key prefix.
            self.add_module(f"layer{i}", nn.Sequential(BasicBlock(cin, cout)))
        self.num_features = widths[-1]
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return torch.flatten(x.mean(dim=(2, 3)), 1)


BACKBONES: dict[str, type[Backbone]] = {"conv4": Conv4, "resnet12": ResNet12}


def build_backbone(name: str, in_channels: int = 3, image_size: int = 84) -> Backbone:
    if name not in BACKBONES:
        raise ConfigError(
            f"unknown backbone '{name}' (config key model.backbone); valid names: "
            + ", ".join(sorted(BACKBONES))
        )
    return BACKBONES[name](in_channels=in_channels, image_size=image_size)
