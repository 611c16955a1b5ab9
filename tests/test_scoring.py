"""Per-checkpoint scores (bench/scoring.py, score_checkpoints.py) and the margin's effect over
epochs (bench/study_epochs.py; margin_study's every-checkpoint path), on the tiny generated data."""

import argparse
import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from negmargin.checkpoint import load_checkpoint, save_checkpoint
from negmargin.config import Config, load_config
from negmargin.evaluate import run_test
from negmargin.head import NegMarginHead
from negmargin.runtime import resolve
from negmargin.testing import tiny_raw, write_config
from negmargin.train import run

from .helpers import REPO

sys.path.insert(0, str(REPO / "bench"))
import margin_study  # noqa: E402
import score_checkpoints  # noqa: E402
import scoring  # noqa: E402
from study_epochs import epoch_pairs, write_epochs  # noqa: E402
from study_report import Setting, Study  # noqa: E402


class _Model(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head


def test_base_hits_is_the_heads_top1_without_margin_over_the_labelled_rows():
    torch.manual_seed(0)
    head = NegMarginHead(16, 5, "cosine", margin=-0.5, temperature=10.0)  # 3 labelled classes + 2 spare rows
    rows = torch.nn.functional.normalize(head.weight.detach(), dim=1)
    feats = rows[[0, 1, 2, 0]] * 3.0  # each image points at one row (scale does not matter)
    labels = np.array([0, 1, 2, 1])
    hits = scoring.base_hits(_Model(head), feats, labels, num_classes=3)
    assert hits.tolist() == [100.0, 100.0, 100.0, 0.0]
    # an image that points at a spare row (never a label) is scored over the labelled rows only
    spare = rows[3] + 0.9 * rows[2]
    hits = scoring.base_hits(_Model(head), spare[None], np.array([2]), num_classes=3)
    assert hits.tolist() == [100.0]
    assert scoring.base_hits(_Model(head), spare[None], np.array([2]), num_classes=5).tolist() == [0.0]


@pytest.fixture(scope="module")
def tiny_run(tiny_root, tmp_path_factory):
    """A 2-epoch tiny run with a checkpoint every epoch, and its config file."""
    tmp = tmp_path_factory.mktemp("scoring")
    raw = tiny_raw(tiny_root, tmp / "cache")
    run(Config.from_dict(raw).validate(), tmp / "wd", progress=False)
    return tmp, write_config(tmp / "tiny.py", raw)


def test_novel_scores_are_test_pys_and_scoring_resumes(tiny_run, monkeypatch, capsys):
    tmp, config = tiny_run
    cfg, rt = resolve(load_config(config))
    out = tmp / "scores" / "run.json"
    argv = [str(config), str(tmp / "wd"), "--out", str(out), "--val-episodes", "30"]
    score_checkpoints.main(argv)
    state = json.loads(out.read_text())
    files = sorted(e["file"] for e in state["checkpoints"])
    assert files == ["best_accuracy_mean.pth", "epoch_1.pth", "epoch_2.pth"]
    table = capsys.readouterr().out
    assert table.count("\n| ") == 4  # header + 3 checkpoints
    # the novel numbers are exactly test.py's for the same checkpoint
    for e in state["checkpoints"]:
        ref = run_test(cfg, tmp / "wd" / e["file"], tmp / "t", shots=[1, 5], progress=False)
        assert [e["novel_1shot"]["mean"], e["novel_5shot"]["mean"]] == pytest.approx([r.mean for r in ref])
        items = np.load(out.parent / "items" / e["items"])
        assert items["val_1shot"].shape == (30,) and items["novel_1shot"].shape == (20,)
        assert float(items["base_hits"].mean()) == pytest.approx(e["base_accuracy"])
        assert len(items["base_hits"]) == 10 * 12  # every base training image (tiny: 10 × 12)
    # val episodes drawn with another seed than training's selection
    assert state["checkpoints"][0]["val_1shot"]["episodes"] == 30
    # a second call scores nothing again; a changed checkpoint is scored anew
    calls = []
    real = scoring.score_checkpoint
    monkeypatch.setattr(scoring, "score_checkpoint", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    score_checkpoints.main(argv)
    assert calls == []
    changed = load_checkpoint(tmp / "wd" / "epoch_1.pth")
    save_checkpoint(tmp / "wd" / "epoch_1.pth", changed | {"note": "rewritten"})
    score_checkpoints.main(argv)
    assert [p.name for p in calls] == ["epoch_1.pth"]
    assert len(json.loads(out.read_text())["checkpoints"]) == 3


def _items(rng, n_img, n_ep, base_p, novel_offset, difficulty):
    return {
        "base_hits": 100.0 * (rng.uniform(size=n_img) < base_p),
        "novel_1shot": difficulty + novel_offset + rng.normal(0, 1, n_ep),
        "novel_5shot": difficulty + 15 + rng.normal(0, 1, n_ep),
    }


def test_epoch_pairs_are_paired_differences_per_epoch(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "items").mkdir()
    difficulty = rng.normal(50, 10, 2000)
    runs = []
    # m = -0.05 costs 1 point at epoch 25 and gains 1 at epoch 50; fits its base images less
    for margin, offsets, base_p in ((0.0, (0, 0), 0.9), (-0.05, (-1, 1), 0.8)):
        checkpoints = []
        for epoch, off in zip((25, 50), offsets):
            name = f"m{margin:+g}_epoch_{epoch}.npz"
            it = _items(rng, 4000, 2000, base_p, off, difficulty)
            np.savez(tmp_path / "items" / name, **it)
            checkpoints.append(
                {"epoch": epoch, "base_accuracy": float(it["base_hits"].mean()), "items": name}
            )
        runs.append({"head": "cosine", "margin": margin, "seed": 0, "temperature": 10.0, "tag": "",
                     "checkpoints": checkpoints})  # fmt: skip
    rows = epoch_pairs(runs, tmp_path)
    assert [r["epoch"] for r in rows] == [25, 50]
    assert rows[0]["novel_1shot_delta"] == pytest.approx(-1, abs=0.15)
    assert rows[1]["novel_1shot_delta"] == pytest.approx(1, abs=0.15)
    assert rows[1]["novel_1shot_ci95"] < 0.1  # paired: the shared difficulty cancels
    assert all(r["base_delta"] == pytest.approx(-10, abs=3) for r in rows)
    assert rows[0]["base_ref"] == pytest.approx(90, abs=2)
    study = Study(REPO, "x", (), "fp32", (), "100-way", "tiny", base_split="train", every_checkpoint=True)
    write_epochs(study, tmp_path, runs)
    md = (tmp_path / "epochs.md").read_text()
    assert md.count("\n| 10 | -0.05 | 0 |") == 2
    pytest.importorskip("matplotlib")
    assert (tmp_path / "epochs.png").stat().st_size > 10_000


def test_margin_study_scores_every_checkpoint_and_pairs_them(tiny_root, tmp_path):
    """The CUB study's path, on tiny data: two runs, every epoch scored, Δ per epoch reported."""
    raw = tiny_raw(tiny_root, tmp_path / "cache")
    config = write_config(tmp_path / "tiny.py", raw)
    study = Study(
        config, "train.txt", (), "fp32",
        (Setting("cosine m=0", "cosine", 0.0, 10.0), Setting("cosine m=-0.05", "cosine", -0.05, 10.0)),
        "10-way, training images", "tiny", base_split="train", every_checkpoint=True,
    )  # fmt: skip
    args = argparse.Namespace(dataset="tiny", data_root=str(tiny_root), precision="fp32", tag="",
                              cfg_options=[], combine=None)  # fmt: skip
    out, runs_dir = tmp_path / "out", tmp_path / "runs"
    results = [margin_study.one_run(args, study, s, 0, runs_dir, out) for s in study.settings]
    margin_study.report(args, study, out, results)
    for r in results:
        assert [c["epoch"] for c in r["checkpoints"]] == [1, 2]
        assert r["final"]["epoch"] == 2 and r["checkpoint_epoch"] == r["best_epoch"]
        assert r["final"]["base_accuracy"] == r["checkpoints"][-1]["base_accuracy"]
    rows = json.loads((out / "epochs.json").read_text())
    assert [(r["margin"], r["epoch"]) for r in rows] == [(-0.05, 1), (-0.05, 2)]
    # the m = 0 run's base fit at epoch 2, from its own items
    zero_items = np.load(out / "items" / results[0]["checkpoints"][1]["items"])
    assert rows[1]["base_ref"] == pytest.approx(float(zero_items["base_hits"].mean()))
    report = json.loads((out / "results.json").read_text())
    assert len(report["paired"]) == 1 and report["paired"][0]["margin"] == -0.05
    # a finished run joins without training again (the reproduction run's way into the study)
    again = margin_study.one_run(args, study, study.settings[0], 0, runs_dir, out)
    assert again["checkpoints"] == results[0]["checkpoints"] and again["resumed"]
    assert replace(study, every_checkpoint=False).base_split == "train"
