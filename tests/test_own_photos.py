"""Own photos with no training first: published models by name, any backbone, a kept classifier,
the benchmark leakage refusal, and cross-domain meta-testing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from negmargin import cli, pretrained
from negmargin.checkpoint import EXPORT_KEYS, load_checkpoint
from negmargin.config import Config
from negmargin.errors import CheckpointError, UserError
from negmargin.fileio import file_sha256
from negmargin.predict import FewShotClassifier
from negmargin.pretrained import MODELS, Preprocessing, PublishedModel, check_benchmark, published
from negmargin.train import run

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


def test_published_models_by_name(capsys):
    assert {"cub-conv4", "imagenet-effnet-lite0"} <= set(MODELS) and cli.main(["models"]) == 0
    listed = capsys.readouterr().out
    assert "cub-conv4" in listed and "non-commercial" in listed and "demo" not in listed
    model = published("imagenet-effnet-lite0")
    assert "Apache-2.0" in model.licence and model.pretrained_on_imagenet
    with pytest.raises(UserError, match="unknown model 'cub-conv5'; published models: cub-conv4, imagenet"):
        published("cub-conv5")


def test_an_exported_checkpoint_tests_and_predicts_like_the_original_but_cannot_resume(
    model_and_images, tmp_path, capsys
):
    tmp, ckpt, raw = model_and_images
    out = tmp_path / "exported.pth"
    assert cli.main(["export", str(ckpt), str(out)]) == 0
    assert "cannot resume training" in capsys.readouterr().out
    full, slim = load_checkpoint(ckpt), load_checkpoint(out)
    assert set(slim) - {"format", "format_version", "negmargin_version", "sha256", "exported_from"} == set(
        EXPORT_KEYS
    )
    assert slim["exported_from"] == {"file": ckpt.name, "sha256": file_sha256(ckpt)}
    assert out.stat().st_size < 0.8 * ckpt.stat().st_size  # no optimizer state, RNG or val episodes
    assert all(torch.equal(full["model"][k], slim["model"][k]) for k in full["model"])
    support, labels = images_of(tmp / "support")
    queries, _ = images_of(tmp / "query")
    a = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit(support, labels)
    b = FewShotClassifier.from_checkpoint(out, device="cpu").fit(support, labels)
    assert torch.equal(a.predict_proba(queries), b.predict_proba(queries))
    results = []
    for path, wd in ((ckpt, tmp_path / "t1"), (out, tmp_path / "t2")):
        assert cli.test_main([str(write_config(tmp_path / "c.py", raw)), str(path), "--work-dir", str(wd),
                              "--quiet", "--n-episodes", "20"]) == 0  # fmt: skip
        results.append(json.loads(next(wd.glob("meta_test_test_*.json")).read_text())["episode_accuracies"])
    assert results[0] == results[1]
    resume = {**raw, "train": {**raw["train"], "epochs": 3}}
    with pytest.raises(CheckpointError, match="no training state to resume"):
        run(Config.from_dict(resume).validate(), tmp_path / "r", progress=False, resume_from=out)


def test_a_checkpoint_shipped_in_the_package_is_a_published_model(model_and_images, tmp_path, monkeypatch):
    tmp, ckpt, _ = model_and_images
    weights = tmp_path / "weights"
    weights.mkdir()
    cli.main(["export", str(ckpt), str(weights / "tiny.pth")])
    model = PublishedModel(name="tiny-conv4", description="", trained_on="tiny", licence="", accuracy="",
                           install="", pretrained_on_imagenet=False, checkpoint="tiny.pth",
                           sha256=file_sha256(weights / "tiny.pth"))  # fmt: skip
    monkeypatch.setattr(pretrained, "WEIGHTS", weights)
    monkeypatch.setitem(MODELS, "tiny-conv4", model)
    support, labels = images_of(tmp / "support")
    queries, _ = images_of(tmp / "query")
    clf = FewShotClassifier.from_pretrained("tiny-conv4", device="cpu").fit(support, labels)
    same = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit(support, labels)
    assert torch.equal(clf.predict_proba(queries), same.predict_proba(queries))
    assert clf.reference == {"kind": "published", "name": "tiny-conv4"}
    kept = FewShotClassifier.load(clf.save(tmp_path / "tiny.clf"))
    assert torch.equal(kept.predict_proba(queries), clf.predict_proba(queries))
    with (weights / "tiny.pth").open("r+b") as f:  # one byte changed on disk
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="does not match its recorded sha256"):
        FewShotClassifier.from_pretrained("tiny-conv4", device="cpu")


def test_the_shipped_cub_conv4_loads_and_embeds():
    model = published("cub-conv4")
    assert not model.pretrained_on_imagenet and "non-commercial" in model.licence
    clf = FewShotClassifier.from_pretrained("cub-conv4", device="cpu")  # checks the file's sha256
    ckpt = load_checkpoint(model.checkpoint_path())
    assert ckpt["config"]["data"]["dataset"] == "cub" and len(ckpt["train_classes"]) == 100
    image = torch.randint(0, 256, (84, 84, 3), dtype=torch.uint8).numpy()
    feats = clf.embed([image, image])
    assert feats.shape == (2, 1600) and torch.isfinite(feats).all() and torch.equal(feats[0], feats[1])


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
