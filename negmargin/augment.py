"""The reference train augmentation and test transform, applied to whole batches.

Random parameters are drawn per sample on the CPU from a seeded NumPy generator
(cheap: a few numbers per image); the pixel work runs batched on the training
device. The distributions are the reference's (mmcls 0.25):

* RandomResizedCrop: up to 10 attempts of area fraction ~ U(scale) and
  log-aspect ~ U(log ratio), sides rounded (half to even, as Python's round);
  the first that fits wins; else a centre crop clamped to the ratio range.
* Horizontal flip with probability ``flip_prob``.
* ColorJitter: for brightness, contrast, saturation a magnitude ~ U(0, value)
  with a random sign (factor 1 ± magnitude), applied in a random order, each a
  blend ``factor·img + (1 − factor)·degenerate`` clipped to 0-255, degenerate =
  black / the rounded mean grey level / the greyscale image (PIL ImageEnhance).
* Normalise with mean/std on the 0-255 scale.

Like the reference (mmcv casts each op's float result back to uint8, and so does
PIL), every blend is truncated to whole grey levels before the next one, which
darkens by about half a level per op; the resize result is rounded, as cv2/PIL
return uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .config import AugmentConfig
from .resample import crop_resize, crop_resize_each, resize_array, resize_short_side

GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL "L" and cv2


@dataclass
class CropParams:
    """Per-sample random parameters of one batch (NumPy, length B)."""

    boxes: np.ndarray  # (B, 4) int64: top, left, height, width
    flip: np.ndarray  # (B,) bool
    jitter: np.ndarray  # (B, 3) float32 factors: brightness, contrast, saturation
    order: np.ndarray  # (B, 3) int64: permutation of (0, 1, 2) = order of the ops


def sample_crop_boxes(
    rng: np.random.Generator,
    heights: np.ndarray,
    widths: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> np.ndarray:
    """RandomResizedCrop boxes (B, 4) = (top, left, h, w) for images of the given sizes."""
    heights = np.asarray(heights, dtype=np.int64)
    widths = np.asarray(widths, dtype=np.int64)
    n = len(heights)
    area = (heights * widths).astype(np.float64)[:, None]
    target = rng.uniform(scale[0], scale[1], (n, attempts)) * area
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (n, attempts)))
    tw = np.round(np.sqrt(target * aspect)).astype(np.int64)
    th = np.round(np.sqrt(target / aspect)).astype(np.int64)
    ok = (tw > 0) & (tw <= widths[:, None]) & (th > 0) & (th <= heights[:, None])
    first = ok.argmax(axis=1)
    found = ok.any(axis=1)
    rows = np.arange(n)
    h = np.where(found, th[rows, first], 0)
    w = np.where(found, tw[rows, first], 0)
    # Offsets uniform over the valid positions (randint(0, H - h) inclusive).
    top = np.floor(rng.random(n) * (heights - h + 1)).astype(np.int64)
    left = np.floor(rng.random(n) * (widths - w + 1)).astype(np.int64)
    if not found.all():
        # Fallback: the whole image, clamped to the aspect ratio range, centred.
        for i in np.flatnonzero(~found):
            H, W = int(heights[i]), int(widths[i])
            in_ratio = W / H
            if in_ratio < min(ratio):
                cw, ch = W, int(round(W / min(ratio)))
            elif in_ratio > max(ratio):
                ch, cw = H, int(round(H * max(ratio)))
            else:
                cw, ch = W, H
            h[i], w[i], top[i], left[i] = ch, cw, (H - ch) // 2, (W - cw) // 2
    return np.stack([top, left, h, w], axis=1)


def sample_params(
    rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray, cfg: AugmentConfig
) -> CropParams:
    """Draw every random choice of the train augmentation for one batch."""
    n = len(heights)
    boxes = sample_crop_boxes(rng, heights, widths, cfg.crop_scale, cfg.crop_ratio)
    flip = rng.random(n) < cfg.flip_prob
    limits = np.array([cfg.brightness, cfg.contrast, cfg.saturation], dtype=np.float64)
    magnitude = rng.random((n, 3)) * limits
    sign = np.where(rng.random((n, 3)) < 0.5, -1.0, 1.0)
    order = np.argsort(rng.random((n, 3)), axis=1)  # a uniform random permutation per row
    return CropParams(boxes, flip, (1.0 + sign * magnitude).astype(np.float32), order)


def grey(x: Tensor) -> Tensor:
    """(B, 3, H, W) or (B, 1, H, W) on 0-255 → (B, 1, H, W) luma."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return GREY_WEIGHTS[0] * r + GREY_WEIGHTS[1] * g + GREY_WEIGHTS[2] * b


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Brightness / contrast / saturation blends in a per-sample order.

    Args:
        x: (B, C, H, W) float on 0-255.
        factors: (B, 3) blend factors for (brightness, contrast, saturation).
        order: (B, 3) int permutation: op applied at each of the 3 steps.
    """
    batch = x.shape[0]
    for step in range(3):
        op = order[:, step].view(batch, 1, 1, 1)
        f = factors.gather(1, order[:, step : step + 1]).view(batch, 1, 1, 1).to(x.dtype)
        g = grey(x)
        mean = torch.round(g.mean(dim=(1, 2, 3), keepdim=True))
        # degenerate = 0 (brightness), mean grey (contrast) or the grey image (saturation)
        degenerate = g * (op == 2).to(x.dtype) + mean * (op == 1).to(x.dtype)
        x = x.mul(f).add_(degenerate.mul_(1 - f)).clamp_(0, 255).floor_()  # uint8 cast, as mmcv
    return x


def normalize(x: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(B, C, H, W) on 0-255 → (x − mean) / std per channel."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def train_batch(
    crops: Tensor,
    crop_hw: Tensor,
    params: CropParams,
    cfg: AugmentConfig,
    size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    per_sample: bool | None = None,
) -> Tensor:
    """Resize pre-cut crops, flip, jitter, normalise.

    Args:
        crops: (B, Hc, Wc, C) uint8 on the device; sample i's crop occupies
            ``[:h_i, :w_i]`` (the loader cuts the boxes out of the cache).
        crop_hw: (B, 2) int64 heights and widths of the crops.

    On the CPU the resize runs per sample on PyTorch's uint8 kernels, on a GPU as
    one batched tap sum (see negmargin/resample.py); both are the same filter.
    ``per_sample`` forces one or the other.

    Returns:
        (B, C, size, size) float32, normalised; contiguous on the CPU path,
        channels-last on the batched one.
    """
    device = crops.device
    if per_sample if per_sample is not None else device.type == "cpu":
        x = crop_resize_each(crops, crop_hw, size, size, cfg.interpolation)
        if params.flip.any():
            flip = torch.from_numpy(params.flip)
            x[flip] = x[flip].flip(-1)
        # The jitter and normalisation run on (B, C, H, W) planes: grey() reads the
        # three channels and the blends broadcast over them, which on channels-last
        # (a channel every third value) takes ~1.5x as long (8.7 vs 6.0 ms per CUB
        # batch on 2 cores). Elementwise work, so the values are the same in either
        # layout (tests/test_augment.py); the loader returns the layout the model wants.
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
    else:
        zeros = torch.zeros_like(crop_hw[:, :1])
        boxes = torch.cat([zeros, zeros, crop_hw], dim=1)
        flip = torch.from_numpy(params.flip).to(device, non_blocking=True)
        x = crop_resize(crops, boxes, size, size, cfg.interpolation, flip)
        x = x.round_().clamp_(0, 255)  # the reference holds a uint8 image after resizing
    if cfg.brightness or cfg.contrast or cfg.saturation:
        factors = torch.from_numpy(params.jitter).to(device, non_blocking=True)
        order = torch.from_numpy(params.order).to(device, non_blocking=True)
        x = color_jitter(x, factors, order)
    return normalize(x, mean, std)


# --------------------------------------------------------------------------- test transform
# The whole test transform lives here: the crop box, one image's view, the tensor the
# model takes. The stored size (the cache keeps val/test images at the short-side
# resize already) is chosen by negmargin.datasets.store_policy from cfg.test_resize.


def eval_crop_box(height: int, width: int, resize_short: int, size: int) -> tuple[int, int, int, int]:
    """Output size after the short-side resize and the centre-crop offset inside it."""
    out_h, out_w = resize_short_side(height, width, resize_short)
    # mmcls CenterCrop: offset = round((side - crop) / 2), Python's half-to-even round.
    return out_h, out_w, int(round((out_h - size) / 2)), int(round((out_w - size) / 2))


def eval_view(image: np.ndarray, resize_short: int, size: int, mode: str) -> np.ndarray:
    """The test transform's pixels for one image (H, W, C) uint8: resize the short side
    to ``resize_short`` (skipped when it already is, as for cached val/test images),
    centre-crop ``size`` → (size, size, C) uint8."""
    h, w = image.shape[:2]
    out_h, out_w, top, left = eval_crop_box(h, w, resize_short, size)
    if (out_h, out_w) != (h, w):
        image = resize_array(image, out_h, out_w, mode)
    return image[top : top + size, left : left + size]


def to_input(
    batch: np.ndarray,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    """(B, H, W, C) uint8 views → normalised (B, C, H, W) float32 on ``device``."""
    x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return normalize(x, mean, std).contiguous(memory_format=memory_format)
