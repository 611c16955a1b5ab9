"""Batched augmentation against per-image PIL / OpenCV references."""

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from negmargin.augment import (
    color_jitter,
    eval_view,
    sample_crop_boxes,
    sample_params,
    to_input,
    train_batch,
)
from negmargin.config import AugmentConfig
from negmargin.resample import crop_resize


def smooth_image(rng, h, w):
    """A photo-like test image: smooth colour fields plus some texture."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    chans = [
        127 + 100 * np.sin(6 * xx * (c + 1) + 4 * yy + c) + 20 * rng.standard_normal((h, w)) for c in range(3)
    ]
    return np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)


BOXES = [
    (10, 20, 300, 400),
    (50, 60, 40, 30),
    (0, 0, 375, 500),
    (100, 100, 84, 84),
    (5, 7, 20, 100),
    (3, 1, 200, 90),
]


@pytest.mark.parametrize("box", BOXES)
def test_pil_mode_matches_pil_crop_then_resize(box):
    img = smooth_image(np.random.default_rng(0), 375, 500)
    t, left, h, w = box
    ref = np.asarray(Image.fromarray(img).crop((left, t, left + w, t + h)).resize((84, 84), Image.BILINEAR))
    out = crop_resize(torch.from_numpy(img)[None], torch.tensor([box]), 84, 84, "pil")[0]
    assert np.abs(out.round().permute(1, 2, 0).numpy() - ref).max() <= 1


def cv2_linear_reference(img: np.ndarray, out: int) -> np.ndarray:
    """OpenCV INTER_LINEAR written out: half-pixel centres, clamped at the edges, float."""

    def taps(n_in):
        fx = (np.arange(out) + 0.5) * n_in / out - 0.5
        sx = np.floor(fx)
        f = fx - sx
        f = np.where((sx < 0) | (sx >= n_in - 1), 0.0, f)
        sx = np.clip(sx, 0, n_in - 1).astype(int)
        return sx, np.minimum(sx + 1, n_in - 1), f

    y0, y1, fy = taps(img.shape[0])
    x0, x1, fx = taps(img.shape[1])
    rows = img[y0] * (1 - fy)[:, None, None] + img[y1] * fy[:, None, None]
    return rows[:, x0] * (1 - fx)[None, :, None] + rows[:, x1] * fx[None, :, None]


@pytest.mark.parametrize("box", BOXES)
def test_cv2_mode_matches_opencv_formula(box):
    img = smooth_image(np.random.default_rng(1), 375, 500)
    t, left, h, w = box
    crop = img[t : t + h, left : left + w].astype(np.float64)
    out = crop_resize(torch.from_numpy(img)[None], torch.tensor([box]), 84, 84, "cv2")[0]
    assert np.abs(out.permute(1, 2, 0).double().numpy() - cv2_linear_reference(crop, 84)).max() < 1e-3
    cv2 = pytest.importorskip("cv2")
    ref = cv2.resize(
        np.ascontiguousarray(img[t : t + h, left : left + w]), (84, 84), interpolation=cv2.INTER_LINEAR
    )
    assert np.abs(out.round().permute(1, 2, 0).numpy() - ref).max() <= 1


def reference_params(rng: random.Random, h, w, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The reference's RandomResizedCrop.get_params, one image at a time (mmcls 0.25)."""
    area = h * w
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        tw = int(round(math.sqrt(target_area * aspect)))
        th = int(round(math.sqrt(target_area / aspect)))
        if 0 < tw <= w and 0 < th <= h:
            return rng.randint(0, h - th), rng.randint(0, w - tw), th, tw
    in_ratio = w / h
    if in_ratio < min(ratio):
        tw, th = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        th, tw = h, int(round(h * max(ratio)))
    else:
        tw, th = w, h
    return (h - th) // 2, (w - tw) // 2, th, tw


def ks_statistic(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(
        np.searchsorted(a, grid, side="right") / len(a) - np.searchsorted(b, grid, side="right") / len(b)
    ).max()


@pytest.mark.parametrize(("h", "w"), [(96, 128), (300, 60), (84, 84)])
def test_crop_parameters_follow_the_reference_distribution(h, w):
    n = 20000
    ours = sample_crop_boxes(
        np.random.default_rng(0), np.full(n, h), np.full(n, w), (0.08, 1.0), (3 / 4, 4 / 3)
    )
    rng = random.Random(0)
    ref = np.array([reference_params(rng, h, w) for _ in range(n)])
    # KS critical value at α = 0.001 for two samples of 20000: 1.95·√(2/n) ≈ 0.0195
    for name, a, b in [
        ("area", ours[:, 2] * ours[:, 3] / (h * w), ref[:, 2] * ref[:, 3] / (h * w)),
        ("log ratio", np.log(ours[:, 3] / ours[:, 2]), np.log(ref[:, 3] / ref[:, 2])),
        ("top", ours[:, 0] / h, ref[:, 0] / h),
        ("left", ours[:, 1] / w, ref[:, 1] / w),
    ]:
        assert ks_statistic(a, b) < 0.0195, name
    assert (
        (ours[:, 0] + ours[:, 2] <= h).all()
        and (ours[:, 1] + ours[:, 3] <= w).all()
        and (ours[:, 2:] > 0).all()
    )


def pil_reference_augment(img, box, flip, factors, order):
    """Per-image PIL pipeline with the same parameters: crop → resize → flip → enhance in order."""
    t, left, h, w = box
    im = Image.fromarray(img).crop((left, t, left + w, t + h)).resize((84, 84), Image.BILINEAR)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
    for op in order:
        im = ops[op](im).enhance(float(factors[op]))
    return np.asarray(im).astype(np.float64)


@pytest.mark.parametrize(
    "per_sample", [True, False], ids=["per-sample (CPU path)", "batched taps (GPU path)"]
)
def test_full_train_augmentation_matches_pil_reference(per_sample):
    rng = np.random.default_rng(0)
    images = [smooth_image(rng, 375, 500), smooth_image(rng, 200, 150), smooth_image(rng, 90, 120)]
    cfg = AugmentConfig(interpolation="pil")
    params = sample_params(
        np.random.default_rng(5),
        np.array([im.shape[0] for im in images] * 4),
        np.array([im.shape[1] for im in images] * 4),
        cfg,
    )
    images = images * 4
    hw = params.boxes[:, 2:]
    crops = np.zeros((len(images), hw[:, 0].max(), hw[:, 1].max(), 3), dtype=np.uint8)
    for i, (im, (t, left, h, w)) in enumerate(zip(images, params.boxes)):
        crops[i, :h, :w] = im[t : t + h, left : left + w]
    out = train_batch(
        torch.from_numpy(crops),
        torch.from_numpy(hw),
        params,
        cfg,
        84,
        (0, 0, 0),
        (1, 1, 1),
        per_sample=per_sample,
    )
    assert params.flip.any() and not params.flip.all()
    diffs = []
    for i, im in enumerate(images):
        ref = pil_reference_augment(im, params.boxes[i], params.flip[i], params.jitter[i], params.order[i])
        diffs.append(np.abs(out[i].permute(1, 2, 0).numpy() - ref))
    diffs = np.stack(diffs)
    # Both sides hold whole grey levels after every step; PIL's integer resize and grey
    # conversion differ from the float ones by ≤ 1 level, which the jitter factors (≤ 1.4)
    # can amplify along the chain. Typical pixels agree.
    assert diffs.max() <= 4 and diffs.mean() < 0.3 and np.median(diffs) == 0


def test_color_jitter_factors_and_order_distribution():
    cfg = AugmentConfig()
    p = sample_params(np.random.default_rng(0), np.full(20000, 100), np.full(20000, 100), cfg)
    mag = np.abs(p.jitter - 1)
    assert (
        mag.max() <= 0.4 and ks_statistic(mag[:, 0], np.random.default_rng(1).uniform(0, 0.4, 20000)) < 0.02
    )
    assert abs((p.jitter < 1).mean() - 0.5) < 0.02  # random sign
    orders = {tuple(o) for o in p.order.tolist()}
    assert len(orders) == 6 and abs(p.flip.mean() - 0.5) < 0.02


def test_jitter_degenerates():
    x = torch.randint(0, 256, (3, 3, 8, 8)).float()
    # brightness factor 0 → black; saturation 0 → grey; contrast 0 → mean grey level
    out = color_jitter(
        x.clone(),
        torch.tensor([[0.0, 1, 1], [1, 0.0, 1], [1, 1, 0.0]]),
        torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0]]),
    )
    assert out[0].abs().max() == 0
    grey = 0.299 * x[1, 0] + 0.587 * x[1, 1] + 0.114 * x[1, 2]
    assert torch.allclose(out[1], torch.round(grey.mean()).expand(3, 8, 8))
    grey2 = 0.299 * x[2, 0] + 0.587 * x[2, 1] + 0.114 * x[2, 2]
    assert torch.allclose(out[2], grey2.floor().expand(3, 8, 8))


def test_eval_transform_is_centre_crop_of_stored_image():
    img = torch.from_numpy(smooth_image(np.random.default_rng(2), 96, 130))[None]
    out = to_input(eval_view(img[0].numpy(), 96, 84, "cv2")[None], (0, 0, 0), (1, 1, 1), torch.device("cpu"))
    left = round((130 - 84) / 2)
    assert torch.equal(out[0], img[0, 6:90, left : left + 84].permute(2, 0, 1).float())


def test_color_jitter_gives_the_same_bits_in_either_memory_layout():
    # train_batch runs the jitter on contiguous planes (faster on the CPU) where it ran on
    # channels-last; elementwise work, so every pixel must be equal bit for bit. Whole grey
    # levels with many repeats and all six orders of the three ops, as the loader feeds it.
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.integers(0, 256, (48, 3, 84, 84)).astype(np.float32))
    x[::5] = torch.from_numpy(rng.integers(100, 104, (10, 3, 84, 84)).astype(np.float32))  # flat images
    p = sample_params(rng, np.full(48, 300), np.full(48, 400), AugmentConfig())
    factors, order = torch.from_numpy(p.jitter), torch.from_numpy(p.order)
    assert len({tuple(o) for o in p.order.tolist()}) == 6
    planes = color_jitter(x.contiguous(), factors, order)
    interleaved = color_jitter(x.contiguous(memory_format=torch.channels_last), factors, order)
    assert interleaved.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(planes, interleaved)
    assert (planes != x).float().mean() > 0.9  # the jitter did change the images
