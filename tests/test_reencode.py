"""bench/reencode.py: the re-encoded copy changes only the test classes' files, and the split."""

import sys

import numpy as np
from PIL import Image

from negmargin.config import Config
from negmargin.datasets import read_source

from .helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
from reencode import reencode_copy  # noqa: E402


def test_copy_reencodes_the_test_classes_and_links_the_rest(tmp_path):
    rng = np.random.default_rng(0)
    root, copy = tmp_path / "cub", tmp_path / "copy"
    for c in range(200):  # CUB's 200 classes (Baseline++ split 100 / 50 / 50), one small photo each
        folder = root / "images" / f"{c + 1:03d}.Bird_{c}"
        folder.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / "0.jpg", quality=95)
    cfg = Config.from_dict({"data": {"dataset": "cub", "root": str(root)}}).validate()
    test = set(read_source(cfg, "test").class_names)
    assert len(test) == 50
    assert reencode_copy(root, copy, test, quality=75) == 50
    assert reencode_copy(root, copy, test, quality=75) == 0  # a complete copy is left as it is
    for f in (root / "images").rglob("*.jpg"):
        g = copy / f.relative_to(root)
        if f.parent.name in test:
            assert not g.samefile(f) and g.read_bytes() != f.read_bytes()
            a, b = (np.asarray(Image.open(p), dtype=float) for p in (f, g))
            assert a.shape == b.shape and np.abs(a - b).mean() < 20  # the same picture, re-encoded
        else:
            assert g.samefile(f)  # hard link: the same file
    copied = Config.from_dict({"data": {"dataset": "cub", "root": str(copy)}}).validate()
    for split in ("train", "val", "test"):
        assert read_source(copied, split).class_names == read_source(cfg, split).class_names
