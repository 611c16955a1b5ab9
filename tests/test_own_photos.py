"""Own photos with no training first: published models by name, any backbone, a kept classifier,
the benchmark leakage refusal, and cross-domain meta-testing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from negmargin import cli
from negmargin.errors import UserError
from negmargin.predict import FewShotClassifier
from negmargin.pretrained import MODELS, Preprocessing, check_benchmark, published

from .helpers import write_config


class TinyNet(nn.Module):
    """A user's own backbone: random weights, (B, 3, 32, 32) → (B, 16)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, stride=2)
        self.num_features = 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x)).mean((2, 3))


def images_of(folder: Path) -> tuple[list[Path], list[str]]:
    paths = sorted(folder.glob("*/*.png"))
    return paths, [p.parent.name for p in paths]


def test_any_backbone_with_its_preprocessing(model_and_images):
    tmp, _, _ = model_and_images
    clf = FewShotClassifier.from_backbone(TinyNet(), Preprocessing(image_size=32, resize=36), device="cpu")
    support, labels = images_of(tmp / "support")
    queries, truth = images_of(tmp / "query")
    assert clf.embed(support[:2]).shape == (2, 16)
    predicted = clf.fit(support, labels).predict(queries)
    assert len(predicted) == len(queries) and set(predicted) <= set(labels)
    with pytest.raises(UserError, match="must be a torch.nn.Module"):
        FewShotClassifier.from_backbone(lambda x: x, Preprocessing(32, 36))  # type: ignore[arg-type]


def test_a_kept_classifier_predicts_bit_for_bit(model_and_images, tmp_path):
    tmp, ckpt, _ = model_and_images
    support, labels = images_of(tmp / "support")
    queries, _ = images_of(tmp / "query")
    clf = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit(support, labels)
    clf.unknown_below = 0.3
    path = clf.save(tmp_path / "birds.clf")
    again = FewShotClassifier.load(path)
    assert again.classes == clf.classes and again.unknown_below == 0.3 and again.steps == clf.steps
    assert torch.equal(again.predict_proba(queries), clf.predict_proba(queries))
    assert again.predict(queries) == clf.predict(queries)
    # a backbone of one's own is passed again on load; the file never holds code
    own = FewShotClassifier.from_backbone(TinyNet(), Preprocessing(32, 36), device="cpu").fit(support, labels)
    own.save(tmp_path / "own.clf")
    with pytest.raises(UserError, match="pass it: FewShotClassifier.load"):
        FewShotClassifier.load(tmp_path / "own.clf")
    assert torch.equal(
        FewShotClassifier.load(tmp_path / "own.clf", backbone=TinyNet()).predict_proba(queries),
        own.predict_proba(queries),
    )


def test_adding_support_refits_without_reading_the_old_images(model_and_images, tmp_path):
    tmp, ckpt, _ = model_and_images
    support, labels = images_of(tmp / "support")
    first = [i for i, label in enumerate(labels) if label != labels[-1]]
    copies = tmp_path / "old"
    for i in first:
        (copies / labels[i]).mkdir(parents=True, exist_ok=True)
        shutil.copy(support[i], copies / labels[i] / support[i].name)
    old = [copies / labels[i] / support[i].name for i in first]
    clf = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit(old, [labels[i] for i in first])
    shutil.rmtree(copies)  # the earlier images are gone: add() must not need them
    new = [i for i in range(len(labels)) if i not in first]
    clf.add([support[i] for i in new], [labels[i] for i in new])
    assert clf.classes == list(dict.fromkeys(labels))
    at_once = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit(
        [support[i] for i in first + new], [labels[i] for i in first + new]
    )
    queries, _ = images_of(tmp / "query")
    assert torch.equal(clf.predict_proba(queries), at_once.predict_proba(queries))


def test_predict_keeps_and_reuses_a_classifier_from_the_command_line(model_and_images, tmp_path, capsys):
    tmp, ckpt, _ = model_and_images
    kept = tmp_path / "kept.clf"
    args = [
        "predict",
        "--checkpoint",
        str(ckpt),
        "--support",
        str(tmp / "support"),
        "--query",
        str(tmp / "query"),
    ]
    assert cli.main([*args, "--save-classifier", str(kept), "--json", "--quiet"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert (
        cli.main(["predict", "--classifier", str(kept), "--query", str(tmp / "query"), "--json", "--quiet"])
        == 0
    )
    assert json.loads(capsys.readouterr().out) == first


def test_published_models_by_name():
    assert "imagenet-effnet-lite0" in MODELS and cli.main(["models"]) == 0
    model = published("imagenet-effnet-lite0")
    assert "Apache-2.0" in model.licence and model.pretrained_on_imagenet
    with pytest.raises(UserError, match="unknown model 'cub-conv5'; published models: imagenet-effnet-lite0"):
        published("cub-conv5")


def test_the_pretrained_backbone_installs_with_pip_and_classifies(model_and_images):
    pytest.importorskip("efficientnet_lite_pytorch")  # the 'pretrained' extra (in the test extra too)
    tmp, _, _ = model_and_images
    clf = FewShotClassifier.from_pretrained("imagenet-effnet-lite0", device="cpu")
    support, labels = images_of(tmp / "support")
    feats = clf.embed(support[:3])
    assert feats.shape == (3, 1280) and torch.isfinite(feats).all()
    assert clf.cfg.data.image_size == 224 and clf.reference == {
        "kind": "published",
        "name": "imagenet-effnet-lite0",
    }


@pytest.mark.parametrize("dataset", ["mini_imagenet", "tiered_imagenet"])
def test_an_imagenet_backbone_is_refused_on_imagenet_benchmarks(dataset, tmp_path, capsys):
    with pytest.raises(UserError, match=f"include the {dataset} test classes"):
        check_benchmark(published("imagenet-effnet-lite0"), dataset)
    args = [
        "meta-test",
        "--model",
        "imagenet-effnet-lite0",
        "--dataset",
        dataset,
        "--data-root",
        str(tmp_path),
    ]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would not be few-shot accuracy" in err[0]
    check_benchmark(published("imagenet-effnet-lite0"), "cub")  # other data: fine


def test_cross_domain_meta_test_on_another_datasets_classes(model_and_images, tmp_path, capsys):
    tmp, ckpt, raw = model_and_images
    root = Path(raw["data"]["root"])
    other = tmp_path / "other"  # another dataset: the novel classes under new names, its own lists
    novel = (root / "test.txt").read_text().split()
    base = (root / "train.txt").read_text().split()
    for i, c in enumerate(novel):
        shutil.copytree(root / c, other / f"bird_{i}")
    for i, c in enumerate(base[:2]):
        shutil.copytree(root / c, other / f"other_{i}")
    (other / "train.txt").write_text("other_0\n")
    (other / "val.txt").write_text("other_1\n")
    (other / "test.txt").write_text("\n".join(f"bird_{i}" for i in range(len(novel))) + "\n")
    config = write_config(tmp_path / "tiny.py", raw)
    wd = tmp_path / "wd"
    args = [str(config), str(ckpt), "--work-dir", str(wd), "--quiet", "--n-episodes", "20",
            "--test-dataset", "folder", "--test-data-root", str(other)]  # fmt: skip
    assert cli.test_main(args) == 0
    result = json.loads(next(wd.glob("meta_test_test_5way-1shot_*.json")).read_text())
    assert result["dataset"] == "folder" and result["n_episodes"] == 20
    assert cli.test_main(args[:-2]) == 2  # the dataset without its folder
    assert "--test-dataset and --test-data-root go together" in capsys.readouterr().err


def test_a_transformers_model_from_a_local_folder(model_and_images, tmp_path):
    transformers = pytest.importorskip("transformers")
    tmp, _, _ = model_and_images
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    folder = tmp_path / "tiny-resnet"
    transformers.ResNetModel(config).save_pretrained(folder)  # random weights: no download
    pre = Preprocessing(image_size=32, resize=36)
    clf = FewShotClassifier.from_transformers(folder, pre, device="cpu")
    support, labels = images_of(tmp / "support")
    queries, _ = images_of(tmp / "query")
    assert clf.embed(support[:2]).shape == (2, 16)
    clf.fit(support, labels)
    kept = FewShotClassifier.load(clf.save(tmp_path / "hf.clf"))
    assert torch.equal(kept.predict_proba(queries), clf.predict_proba(queries))
    with pytest.raises(UserError, match="no preprocessor_config.json"):
        FewShotClassifier.from_transformers(folder)
    with pytest.raises(UserError, match="not a saved transformers model"):
        FewShotClassifier.from_transformers(tmp_path)
