"""How much does one more JPEG re-encoding of the test images move a checkpoint's accuracy?

    python bench/reencode.py CONFIG CHECKPOINT --data-root data/CUB_200_2011 --copy /tmp/cub_reenc \
        [--quality 75] [--shots 1 5]

The public CUB copy this project trains on was re-saved as JPEG at quality 75, so it is not
byte-identical to the official archive (docs/cub.md). This measures the test-time part of that
difference: it writes a copy of the dataset (``--copy``) whose **test-class** images are decoded
and saved once more at ``--quality`` (the other classes hard-linked, so the class split is the
same), meta-tests CHECKPOINT on the original and on the copy with the same 2000 episodes, and
prints the paired difference per shot count (re-encoded − original ± 95% CI). The training-time
part (a model trained on re-encoded images) needs a full training run and is not measured here.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from negmargin.config import load_config  # noqa: E402
from negmargin.datasets import read_source  # noqa: E402
from negmargin.evaluate import run_test  # noqa: E402
from negmargin.meta_test import paired_difference  # noqa: E402


def reencode_copy(root: Path, copy: Path, test_classes: set[str], quality: int) -> int:
    """``copy/images/<class>/``: test classes re-saved at ``quality``, others hard-linked; returns
    the number of images re-encoded (a copy already complete is left as it is)."""
    n = 0
    for cls in sorted(os.listdir(root / "images")):
        (copy / "images" / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((root / "images" / cls).iterdir()):
            out = copy / "images" / cls / f.name
            if out.exists():
                continue
            if cls in test_classes:
                with Image.open(f) as im:
                    im.convert("RGB").save(out, quality=quality)
                n += 1
            else:
                os.link(f, out)
    return n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("checkpoint")
    parser.add_argument("--data-root", required=True, help="the dataset (CUB layout: images/<class>/*.jpg)")
    parser.add_argument("--copy", required=True, help="folder for the re-encoded copy (same file system)")
    parser.add_argument("--quality", type=int, default=75)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    args = parser.parse_args()
    root, copy = Path(args.data_root), Path(args.copy)
    cfg = load_config(args.config, [f"data.root='{root}'"])
    test_classes = set(read_source(cfg, "test").class_names)
    n = reencode_copy(root, copy, test_classes, args.quality)
    print(f"{n} test images re-encoded at quality {args.quality} into {copy}")
    work = Path(tempfile.mkdtemp(prefix="negmargin-reencode-"))
    original = run_test(cfg, args.checkpoint, work / "original", args.shots, progress=False)
    again = run_test(cfg, args.checkpoint, work / "copy", args.shots, progress=False,
                     test_data=(cfg.data.dataset, str(copy)))  # fmt: skip
    for a, b in zip(again, original):
        delta, ci = paired_difference(a.accuracies, b.accuracies)
        print(
            f"5-way {a.n_shot}-shot: original {b.mean:.2f} ± {b.ci95:.2f}, re-encoded {a.mean:.2f} ± {a.ci95:.2f}; "
            f"paired Δ {delta:+.2f} ± {ci:.2f} ({len(a.accuracies)} episodes)"
        )


if __name__ == "__main__":
    main()
