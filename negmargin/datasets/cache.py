"""The packed image cache: every image of a split decoded once, stored as uint8.

Layout of one cache folder (``<cache dir>/<dataset>-<split>-<policy>/``):

* ``images.u8`` — the images back to back, each (H, W, C) uint8, read through a
  memory map (no decoding, no copy until a batch is cut from it);
* ``index.npy`` — (n, 4) int64: byte offset, H, W, C of each image;
* ``labels.npy`` — (n,) int64; ``meta.json`` — class names and reader metadata;
* ``manifest.json`` — source layout, counts, store policy and the checksum of
  the inputs' listing. A cache whose manifest matches is reused as is; the whole
  folder is written under a temporary name and renamed when complete.

Stored sizes (why):

* **val/test**: the short side is resized to the test transform's size (96 for
  an 84 input) with the reference's own filter, exactly the reference's test
  Resize; the test transform is then a plain centre crop of the stored image.
* **train**: the short side is reduced to ``data.train_store_size`` (256) if it
  is larger, never enlarged, with an antialiased filter. RandomResizedCrop with
  area fraction s ≥ 0.08 and ratio in [3/4, 4/3] cuts a crop whose short side is
  at least √(s·¾·H·W); for a 4:3 image with a 256 short side that is ≥ 72 px, and
  ≥ 84 px (no enlargement to the 84 input) whenever s ≥ 0.108 — all but about 3%
  of the draws, and only at the extreme aspect ratios. So nearly every training
  crop keeps as many pixels as the reference's crop of the original, while CUB's
  ~500×375 images take half the space (CUB train: 1.6 GB; mini train from the
  original ImageNet files: 10 GB). Sources that are already small (the 84×84
  mini release, tieredImageNet, Omniglot) are stored at their own size.
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError
from ..fileio import DiskFullError, atomic_write_text, check_free_space, process_alive
from ..imageio import read_image, read_size
from ..resample import resize_array, resize_short_side
from ..runlog import progress_bar
from .base import SplitSource

CACHE_VERSION = 1
CHUNK = 128  # images per task sent to a decode process


@dataclass(frozen=True)
class StorePolicy:
    """How images are stored: short side, whether it may grow, filter, channels."""

    short: int  # 0 = keep the source size
    upscale: bool  # True: resize to exactly ``short`` (the test Resize); False: only shrink
    filter: str  # "cv2" or "pil" (see negmargin/resample.py)
    channels: int

    def tag(self) -> str:
        return f"s{self.short}{'x' if self.upscale else ''}-{self.filter}-c{self.channels}"


def decode_and_store(payload: bytes | str, name: str, policy: StorePolicy, rotation: int) -> np.ndarray:
    """Decode one image and bring it to the stored size: (H, W, C) uint8."""
    img = read_image(payload, policy.channels, name=name)
    if rotation:
        img = np.ascontiguousarray(np.rot90(img, k=rotation, axes=(0, 1)))
    h, w = img.shape[:2]
    out_h, out_w = stored_shape(h, w, policy)
    if (out_h, out_w) != (h, w):
        img = resize_array(img, out_h, out_w, policy.filter)
    return img


def _decode_chunk(tasks: list[tuple[Any, str, int]], policy: StorePolicy) -> list[np.ndarray | str]:
    out: list[np.ndarray | str] = []
    for payload, name, rotation in tasks:
        try:
            out.append(decode_and_store(payload, name, policy, rotation))
        except DataError as exc:
            out.append(str(exc))
    return out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # each decode process uses one core


class PackedSplit:
    """A prepared split, memory-mapped. ``image(i)`` is a (H, W, C) uint8 view."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        meta = json.loads((self.folder / "meta.json").read_text())
        self.class_names: list[str] = meta["class_names"]
        self.metadata: dict[str, Any] = meta.get("metadata", {})
        self.index = np.load(self.folder / "index.npy")
        self.labels = np.load(self.folder / "labels.npy")
        self.policy = StorePolicy(**self.manifest["policy"])
        self.buffer = np.memmap(self.folder / "images.u8", dtype=np.uint8, mode="r")
        self.heights = self.index[:, 1]
        self.widths = self.index[:, 2]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dataset(self) -> str:
        return self.manifest["dataset"]

    @property
    def split(self) -> str:
        return self.manifest["split"]

    def image(self, i: int) -> np.ndarray:
        offset, h, w, c = (int(v) for v in self.index[i])
        return self.buffer[offset : offset + h * w * c].reshape(h, w, c)

    def __repr__(self) -> str:
        return f"PackedSplit({self.dataset}/{self.split}: {len(self)} images, {self.num_classes} classes)"


def default_cache_dir(root: Path, dataset: str) -> Path:
    """``<root>/.negmargin_cache`` if the root is writable, else a per-user cache folder."""
    env = os.environ.get("NEGMARGIN_CACHE_DIR")
    if env:
        digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
        return Path(env) / f"{dataset}-{digest}"
    if root.is_dir() and os.access(root, os.W_OK):
        return root / ".negmargin_cache"
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "negmargin"
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return base / f"{dataset}-{digest}"


def _manifest(source: SplitSource, policy: StorePolicy, count: int, skipped: list[str]) -> dict:
    return {
        "version": CACHE_VERSION,
        "dataset": source.dataset,
        "split": source.split,
        "layout": source.layout,
        "fingerprint": source.fingerprint,
        "policy": asdict(policy),
        "count": count,
        "num_classes": len(source.class_names),
        "skipped": skipped,
    }


def is_current(folder: Path, source: SplitSource, policy: StorePolicy) -> bool:
    try:
        m = json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        m.get("version") == CACHE_VERSION
        and m.get("fingerprint") == source.fingerprint
        and m.get("policy") == asdict(policy)
        and (folder / "images.u8").is_file()
    )


def remove_dead_temporaries(folder: Path) -> None:
    """Remove the half-written caches (``.<name>.tmp-PID``, ``.<name>.old-PID``) that a killed
    preparation left beside ``folder``; a live process's own stay (it may still be writing)."""
    for leftover in folder.parent.glob(f".{folder.name}.*-*"):
        kind, _, pid = leftover.name.rpartition("-")
        if kind.endswith((".tmp", ".old")) and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def stored_shape(height: int, width: int, policy: StorePolicy) -> tuple[int, int]:
    """(H, W) at which :func:`decode_and_store` stores a (height, width) source image."""
    short = min(height, width)
    if policy.short and (short > policy.short or (policy.upscale and short != policy.short)):
        return resize_short_side(height, width, policy.short)
    return height, width


def estimate_bytes(source: SplitSource, policy: StorePolicy, sample: int = 64) -> int:
    """Bytes the cache of ``source`` will take: the mean stored size of up to ``sample``
    evenly spaced images, read from their headers, times the count, plus 25% for the
    images not sampled. Where no size can be sampled (no ``peek``, unreadable headers),
    the bound of a 4:3 image at a 256-px short side (or at the policy's short side).
    """
    n = len(source)
    peek = source.peek if source.decode is not None else (lambda item: item)
    sizes = []
    if n and peek is not None:
        for i in np.unique(np.linspace(0, n - 1, min(sample, n)).round().astype(int)):
            try:
                h, w = stored_shape(*read_size(peek(source.items[i])), policy)
            except DataError:
                continue
            sizes.append(h * w)
    if sizes:
        per_image = float(np.mean(sizes)) * 1.25
    else:
        side = policy.short or 256
        per_image = side * side * 4 / 3
    return int(n * per_image * policy.channels)


def prepare(
    source: SplitSource,
    policy: StorePolicy,
    cache_dir: str | Path,
    workers: int = 0,
    skip_bad: bool = False,
    progress: bool = True,
) -> PackedSplit:
    """Return the packed cache of ``source``, building it first if it is missing or stale."""
    variant = f"-{source.cache_variant}" if source.cache_variant else ""
    folder = Path(cache_dir) / f"{source.dataset}-{source.split}{variant}-{policy.tag()}"
    if is_current(folder, source, policy):
        return PackedSplit(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"cannot create the cache folder '{folder.parent}' ({exc.strerror}); "
            "set data.cache_dir to a writable folder"
        ) from None
    check_free_space(
        folder.parent,
        estimate_bytes(source, policy),
        f"the image cache of {source.dataset}/{source.split}",
        elsewhere="another cache folder with data.cache_dir",
    )
    remove_dead_temporaries(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        index, keep, bad = _write_images(source, policy, tmp / "images.u8", workers, progress)
        if bad and not skip_bad:
            listing = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
            raise DataError(
                f"{len(bad)} unreadable image(s) in {source.dataset}/{source.split} "
                f"(set data.skip_bad_images=True or pass --skip-bad-images to skip them):\n  {listing}"
            )
        if bad:
            print(
                f"skipped {len(bad)} unreadable image(s) of {source.dataset}/{source.split}", file=sys.stderr
            )
        labels = source.labels[keep]
        np.save(tmp / "index.npy", np.asarray(index, dtype=np.int64).reshape(-1, 4))
        np.save(tmp / "labels.npy", labels)
        present = np.bincount(labels, minlength=len(source.class_names))
        if (present == 0).any():
            empty = [source.class_names[i] for i in np.flatnonzero(present == 0)]
            raise DataError(
                f"class(es) {', '.join(empty[:10])} of {source.dataset}/{source.split} "
                "have no readable image left"
            )
        (tmp / "meta.json").write_text(
            json.dumps({"class_names": source.class_names, "metadata": source.metadata}, ensure_ascii=False)
        )
        atomic_write_text(
            tmp / "manifest.json",
            json.dumps(_manifest(source, policy, len(labels), bad[:1000]), indent=1, ensure_ascii=False),
        )
        if folder.exists():
            stale = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(
                f"disk full while preparing the cache in '{folder.parent}'; free space or set data.cache_dir"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return PackedSplit(folder)


def _write_images(source, policy, out_path, workers, progress):
    """Decode all images (in processes when there are many) and append them to ``out_path``."""
    n = len(source)
    rotations = source.rotations if source.rotations is not None else np.zeros(n, dtype=np.int64)
    workers = workers or os.cpu_count() or 1
    use_pool = workers > 1 and n >= 4 * CHUNK

    def tasks(start: int) -> list[tuple[Any, str, int]]:
        stop = min(start + CHUNK, n)
        out = []
        for i in range(start, stop):
            item = source.items[i]
            payload = source.decode(item) if source.decode is not None else item
            out.append((payload, source.item_name(i), int(rotations[i])))
        return out

    index: list[tuple[int, int, int, int]] = []
    keep: list[int] = []
    bad: list[str] = []
    offset = 0
    bar = progress_bar(total=n, desc=f"prepare {source.dataset}/{source.split}", unit="img", enabled=progress)
    with open(out_path, "wb") as out:

        def consume(start: int, results: list[np.ndarray | str]) -> None:
            nonlocal offset
            for j, res in enumerate(results):
                if isinstance(res, str):
                    bad.append(res)
                    continue
                out.write(res.tobytes())
                h, w, c = res.shape
                index.append((offset, h, w, c))
                keep.append(start + j)
                offset += h * w * c
            bar.update(len(results))

        if not use_pool:
            for start in range(0, n, CHUNK):
                consume(start, _decode_chunk(tasks(start), policy))
        else:
            # A bounded window of chunks in flight: bytes from a pickle are handed
            # over chunk by chunk rather than all at once.
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
                starts = list(range(0, n, CHUNK))
                pending: dict[int, cf.Future] = {}
                next_submit = 0
                for start in starts:
                    while next_submit < len(starts) and len(pending) < 2 * workers:
                        s = starts[next_submit]
                        pending[s] = pool.submit(_decode_chunk, tasks(s), policy)
                        next_submit += 1
                    consume(start, pending.pop(start).result())
    bar.close()
    return index, np.asarray(keep, dtype=np.int64), bad
