"""Score every saved checkpoint of a training run: base fit, val on many episodes, novel test.

    python bench/score_checkpoints.py CONFIG WORK_DIR --out docs/cub/run1_checkpoints.json \
        [--base-split train] [--val-episodes 2000] [--cfg-options data.root=...]

For each ``epoch_<N>.pth`` and ``best_accuracy_mean.pth`` in WORK_DIR (see ``scoring.py``):
accuracy of the head (no margin) on the base training images with the test transform — how
well the model fits its base classes, which the training log's running mean over augmented
batches does not say; 5-way 1-shot accuracy on ``--val-episodes`` val episodes drawn with
another seed than training's 100 (to choose among checkpoints without the 100-episode noise,
and never on test episodes); and the benchmark's 2000 1-shot and 5-shot test episodes.

``--out`` keeps one entry per checkpoint (by content) and is rewritten after each, so a second
call scores only checkpoints it has not seen; per-episode scores go to ``items/`` beside it
for paired comparisons. Prints a markdown table. Runs in the config's precision on the
config's device (``train.precision``, ``train.device``), as ``test.py`` does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scoring import score_run  # noqa: E402

from negmargin.config import load_config  # noqa: E402
from negmargin.runtime import resolve  # noqa: E402


def table(entries: list[dict]) -> str:
    """Markdown: one row per checkpoint."""
    has_val = any("val_1shot" in e for e in entries)
    head = (
        ["checkpoint", "epoch", "base fit"]
        + (["val 1-shot"] if has_val else [])
        + ["novel 1-shot", "novel 5-shot"]
    )
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in entries:
        cells = [e["file"], str(e["epoch"]), f"{e['base_accuracy']:.2f} ± {e['base_ci95']:.2f}"]
        if has_val:
            cells.append(
                f"{e['val_1shot']['mean']:.2f} ± {e['val_1shot']['ci95']:.2f}" if "val_1shot" in e else ""
            )
        cells += [f"{e[k]['mean']:.2f} ± {e[k]['ci95']:.2f}" for k in ("novel_1shot", "novel_5shot")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config")
    parser.add_argument("work_dir")
    parser.add_argument("--out", required=True, help="the scores' JSON (items/ beside it)")
    parser.add_argument("--base-split", default="train", choices=["train", "train_holdout"])
    parser.add_argument("--val-episodes", type=int, default=2000, help="0: no val scores")
    parser.add_argument("--cfg-options", nargs="+", default=[])
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    if not any(work_dir.glob("*.pth")):
        parser.error(f"no checkpoints in '{work_dir}'")
    cfg, rt = resolve(load_config(args.config, args.cfg_options))
    out = Path(args.out)
    entries = score_run(cfg, work_dir, out, out.parent / "items", rt, args.base_split, args.val_episodes)
    print(table(entries))


if __name__ == "__main__":
    main()
