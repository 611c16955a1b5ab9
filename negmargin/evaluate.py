"""Meta-testing a checkpoint: ``tools/classification/test.py``.

Loads the checkpoint (safely), builds the model the config describes, extracts
the test split's features once (cached on disk by checkpoint content, split and
transform), and meta-tests one or several shot settings with the batched engine.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from . import distributed as dist
from .config import Config, EvalConfig
from .datasets import load_split
from .errors import CheckpointError, DataError
from .features import cached_features
from .fileio import atomic_write_text, file_sha256
from .meta_test import MetaTestResult, run_meta_test
from .model import load_trained_model
from .runtime import configure_process, main_first, resolve, start_run


def results_name(
    checkpoint: str | Path, digest: str, cfg: Config, split: str, episodes_cfg: EvalConfig
) -> str:
    """``meta_test_<split>_<N>way-<K>shot_<checkpoint name>_<key>.json``: the key hashes the
    checkpoint's content and every setting that changes the numbers, so results of different
    checkpoints or settings never replace each other (the same test run again rewrites its own)."""
    settings = (digest, cfg.data.dataset, cfg.data.root, split, asdict(episodes_cfg), asdict(cfg.finetune))
    key = hashlib.sha256(repr(settings).encode()).hexdigest()[:8]
    return f"meta_test_{split}_{episodes_cfg.n_way}way-{episodes_cfg.n_shot}shot_{Path(checkpoint).stem}_{key}.json"


def check_no_leak(
    train_classes: list[str] | None, test_classes: list[str], checkpoint: str | Path, split: str
) -> None:
    """Refuse to meta-test on classes the checkpoint was trained on (its ``train_classes``)."""
    leaked = sorted(set(train_classes or ()) & set(test_classes))
    if leaked:
        raise DataError(
            f"checkpoint '{checkpoint}' was trained on {len(leaked)} class(es) of the {split} split "
            f"({', '.join(leaked[:3])}{', ...' if len(leaked) > 3 else ''}): its accuracy on them would not "
            "be few-shot accuracy; the class split changed since training (fix the split lists or retrain)"
        )


def run_test(
    cfg: Config,
    checkpoint_path: str | Path,
    work_dir: str | Path,
    shots: list[int] | None = None,
    split: str = "test",
    show_task_results: bool = False,
    progress: bool = True,
    steps: int | None = None,
    test_data: tuple[str, str] | None = None,
) -> list[MetaTestResult]:
    """Meta-test ``checkpoint_path`` on ``split`` for each shot count; write JSON results.

    Fine-tune steps: ``steps`` if given, else the config's for its own shot count and
    the protocol's rule (150 / 600) for the other shot counts. ``test_data``: (dataset, root) of
    another dataset to take the split from (cross-domain: e.g. trained on miniImageNet, tested on
    CUB's novel classes), with the checkpoint's own transform.
    """
    work_dir = Path(work_dir)
    log, show = start_run(cfg, work_dir, progress, log_files=False)
    cfg, rt = resolve(cfg)
    configure_process(cfg, rt)
    model, ckpt = load_trained_model(cfg, checkpoint_path, rt.device, channels_last=rt.channels_last)
    data_cfg = cfg
    if test_data is not None:
        data_cfg = replace(cfg, data=replace(cfg.data, dataset=test_data[0], root=test_data[1], options={}))
    with main_first():
        packed = load_split(data_cfg, split, progress=show, log=log.info)
    check_no_leak(ckpt.get("train_classes"), packed.class_names, checkpoint_path, split)
    feats = cached_features(
        model.backbone, packed, cfg, rt, work_dir / "features", progress=show, log=log.info
    )
    if not torch.isfinite(feats).all():
        raise CheckpointError(
            f"checkpoint '{checkpoint_path}' gives non-finite features on the {split} split "
            "(damaged weights, or a training run that diverged); no accuracy is reported"
        )
    digest = file_sha256(checkpoint_path)
    results = []
    for n_shot in shots or [cfg.meta_test.n_shot]:
        ev = cfg.meta_test
        if n_shot != ev.n_shot:
            ev = replace(ev, n_shot=n_shot, steps=None)  # the protocol's steps for that shot count
        if steps is not None:
            ev = replace(ev, steps=steps)
        result = run_meta_test(
            feats,
            packed.labels,
            ev,
            cfg.finetune,
            packed.class_names,
            where=f"{split} split",
            progress=show,
            desc=f"meta-test {ev.n_way}-way {n_shot}-shot",
        )
        result = replace(
            result,
            extra={
                "split": split,
                "dataset": data_cfg.data.dataset,
                "checkpoint": str(checkpoint_path),
                "config": cfg.name,
                "episode_seed": ev.episode_seed,
                "finetune_seed": cfg.finetune.seed,
                "checkpoint_epoch": ckpt.get("epoch"),
                "checkpoint_sha256": digest,
            },
        )
        results.append(result)
        if dist.is_main():
            if show_task_results:
                for i, acc in enumerate(result.accuracies):
                    print(f"task {i}: accuracy {acc:.2f}")
            print(result.line())
            print(f"accuracy_mean: {result.mean:.2f}")
            print(f"accuracy_ci95: {result.ci95:.2f}  (95% confidence interval half-width)")
            out = work_dir / results_name(checkpoint_path, digest, data_cfg, split, ev)
            atomic_write_text(out, json.dumps(result.to_dict(with_episodes=True), indent=1))
            print(f"results written to {out}")
    dist.barrier()
    return results
