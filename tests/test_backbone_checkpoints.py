"""Every backbone of ``BACKBONES`` through a checkpoint: train → resume → test → predict.

Adding a backbone is one ``BACKBONES`` entry plus its tests: a checkpoint names its
backbone in its stored config, so nothing guesses it from key names (only imported
mmfewshot files, which carry no config, are recognised by their keys).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from negmargin.backbones import BACKBONES
from negmargin.checkpoint import load_checkpoint
from negmargin.datasets import load_split
from negmargin.evaluate import run_test
from negmargin.predict import FewShotClassifier
from negmargin.train import run


class LookAlike(nn.Module):
    """A new backbone whose weight keys start like Conv4's (``layers.0.layers.0``): a key-name
    guess would take its checkpoints for Conv4 ones."""

    def __init__(self, in_channels: int = 3, image_size: int = 84) -> None:
        super().__init__()
        block = nn.Module()
        block.layers = nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.layers = nn.ModuleList([block])
        self.num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0].layers(x).mean((2, 3))


def round_trip(name, tiny_cfg, tmp_path):
    work_dir = tmp_path / name
    cfg = tiny_cfg(model={"backbone": name}, train={"epochs": 1, "checkpoint_interval": 1})
    run(cfg, work_dir, progress=False)
    longer = tiny_cfg(model={"backbone": name}, train={"epochs": 2, "checkpoint_interval": 1})
    summary = run(longer, work_dir, auto_resume=True, progress=False)  # resumes at epoch 2
    assert [h["epoch"] for h in summary["history"]] == [1, 2]  # validated after each epoch
    ckpt = load_checkpoint(work_dir / "latest.pth")
    assert ckpt["epoch"] == 2 and ckpt["config"]["model"]["backbone"] == name

    results = run_test(longer, work_dir / "latest.pth", work_dir, [1], progress=False)
    assert 0 <= results[0].mean <= 100
    saved = json.loads(next(work_dir.glob("meta_test_test_5way-1shot_latest_*.json")).read_text())
    assert saved["accuracy_mean"] == pytest.approx(results[0].mean)

    test = load_split(longer, "test", progress=False)
    clf = FewShotClassifier.from_checkpoint(work_dir / "latest.pth", device="cpu")
    assert type(clf.backbone) is BACKBONES[name]
    images = [test.image(i) for i in range(len(test))]
    labels = test.labels.tolist()
    predicted = clf.fit(images[::3], labels[::3]).predict(images[1::3])
    assert len(predicted) == len(images[1::3]) and set(predicted) <= set(labels)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_trains_resumes_tests_and_predicts(name, tiny_cfg, tmp_path):
    round_trip(name, tiny_cfg, tmp_path)


def test_a_new_backbone_is_one_entry(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(BACKBONES, "lookalike", LookAlike)
    round_trip("lookalike", tiny_cfg, tmp_path)
