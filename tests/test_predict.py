"""Few-shot prediction on a user's own images: CLI and Python API."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from negmargin import cli
from negmargin.checkpoint import load_checkpoint, save_checkpoint
from negmargin.config import Config
from negmargin.datasets import load_split
from negmargin.features import extract_features
from negmargin.model import load_trained_model
from negmargin.predict import FewShotClassifier
from negmargin.runtime import resolve

from .helpers import write_config


def test_predicts_held_out_images_far_above_chance(model_and_images, capsys):
    tmp, ckpt, _ = model_and_images
    out = tmp / "pred.csv"
    code = cli.main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--support",
            str(tmp / "support"),
            "--query",
            str(tmp / "query"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 * 9
    assert set(rows[0]) >= {"path", "predicted", "probability", "top1_class", "top3_probability"}
    accuracy = np.mean([Path(r["path"]).parent.name == r["predicted"] for r in rows])
    assert accuracy > 0.6  # chance is 0.2
    probs = [float(r["probability"]) for r in rows]
    assert all(0.2 <= p <= 1 for p in probs)
    printed = capsys.readouterr().out
    assert "predicted" in printed and rows[0]["predicted"] in printed

    # The Python API gives the same predictions from the same inputs.
    clf = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit_folder(tmp / "support")
    api = clf.predict([r["path"] for r in rows])
    assert api == [r["predicted"] for r in rows]
    proba = clf.predict_proba([rows[0]["path"]])
    assert proba.shape == (1, 5) and torch.allclose(proba.sum(-1), torch.ones(1))


def test_json_output_and_uneven_shots(model_and_images, capsys):
    tmp, ckpt, _ = model_and_images
    support = tmp / "uneven"
    shutil.copytree(tmp / "support", support)
    first, second = sorted(support.iterdir())[:2]
    for f in sorted(first.iterdir())[1:]:
        f.unlink()  # 1 shot for this class, 3 for the others
    shutil.copy(next((tmp / "query" / second.name).iterdir()), second / "extra.png")  # 4 shots
    code = cli.main(
        [
            "predict",
            "--checkpoint",
            str(ckpt),
            "--support",
            str(support),
            "--query",
            str(tmp / "query" / first.name),
            "--json",
            "--top-k",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 9 and len(rows[0]["top_k"]) == 2


def test_images_in_any_mode_as_paths_pil_and_tensors(model_and_images, tmp_path):
    tmp, ckpt, _ = model_and_images
    clf = FewShotClassifier.from_checkpoint(ckpt, device="cpu").fit_folder(tmp / "support")
    src = next((tmp / "query").iterdir())
    img = Image.open(next(src.iterdir())).convert("RGB")
    paths = []
    for mode in ("L", "RGBA", "P", "CMYK"):
        p = tmp_path / f"{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.convert(mode).save(p)
        paths.append(p)
    exif = Image.Exif()
    exif[0x0112] = 8
    img.save(tmp_path / "exif.jpg", exif=exif)
    paths.append(tmp_path / "exif.jpg")
    assert len(clf.predict(paths)) == 5
    arr = np.array(img)
    tensor_float = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    by_path, by_pil, by_tensor = (
        clf.predict([paths[0].with_name("exif.jpg")]),
        clf.predict([img]),
        clf.predict([tensor_float]),
    )
    assert by_pil == by_tensor and len(by_path) == 1


def run_predict(args, capsys):
    code = cli.main(["predict", *args, "--device", "cpu"])
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_give_one_line_errors(model_and_images, tmp_path, capsys):
    tmp, ckpt, raw = model_and_images
    query = ["--query", str(tmp / "query")]
    base = ["--checkpoint", str(ckpt)]

    empty = tmp_path / "empty_class"
    shutil.copytree(tmp / "support", empty)
    (empty / "nothing_here").mkdir()
    single = tmp_path / "single"
    shutil.copytree(next((tmp / "support").iterdir()), single / "only")
    broken = tmp_path / "broken"
    shutil.copytree(tmp / "support", broken)
    (next(broken.iterdir()) / "bad.png").write_bytes(b"\x89PNG\r\n not a png")
    text = tmp_path / "text"
    shutil.copytree(tmp / "support", text)
    (next(text.iterdir()) / "labels.csv").write_text("a,b\n")
    not_ours = tmp_path / "other.pth"
    torch.save({"weights": torch.zeros(3)}, not_ours)
    resnet_cfg = write_config(
        tmp_path / "resnet.py", {**raw, "model": {**raw["model"], "backbone": "resnet12"}}
    )

    cases = [
        (
            [*base, "--support", str(empty), *query],
            "class folder '" + str(empty / "nothing_here") + "' is empty",
        ),
        (
            [*base, "--support", str(single), *query],
            "has 1 class folder(s); few-shot prediction needs at least 2",
        ),
        ([*base, "--support", str(broken), *query], "bad.png"),
        ([*base, "--support", str(text), *query], "labels.csv' in the support set is not an image file"),
        (
            ["--checkpoint", str(not_ours), "--support", str(tmp / "support"), *query],
            "is not a negmargin checkpoint",
        ),
        (
            [*base, "--config", str(resnet_cfg), "--support", str(tmp / "support"), *query],
            "holds a conv4 backbone but the config says model.backbone='resnet12'",
        ),
        (
            [*base, "--support", str(tmp / "support"), "--query", str(tmp_path / "missing.jpg")],
            "does not exist",
        ),
    ]
    for args, expected in cases:
        code, err = run_predict(args, capsys)
        assert code != 0, expected
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (expected, err)


def test_embed_exports_features(model_and_images, tmp_path, capsys):
    tmp, ckpt, _ = model_and_images
    out = tmp_path / "feats.npz"
    assert (
        cli.main(
            ["embed", "--checkpoint", str(ckpt), str(tmp / "support"), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    data = np.load(out)
    assert data["features"].shape == (15, 256) and len(data["paths"]) == 15
    clf = FewShotClassifier.from_checkpoint(ckpt, device="cpu")
    assert np.allclose(clf.embed([data["paths"][0]]).numpy()[0], data["features"][0], atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_embeds_exactly_as_the_meta_test(model_and_images, tmp_path, precision):
    """One image → feature path: for one checkpoint and the same images, predict's features
    are test.py's bit for bit, in the precision stored with the checkpoint."""
    _, ckpt, raw = model_and_images
    stored = load_checkpoint(ckpt)
    stored["config"]["train"]["precision"] = precision  # as if trained in that precision
    own = tmp_path / "ckpt.pth"
    save_checkpoint(
        own, {k: v for k, v in stored.items() if not k.startswith(("format", "negmargin_version"))}
    )
    cfg = Config.from_dict(
        {**raw, "train": {**raw["train"], "precision": precision, "device": "cpu"}}
    ).validate()

    # test.py's path (evaluate.run_test): resolve, load, extract the test split's features
    cfg, rt = resolve(cfg)
    model, _ = load_trained_model(cfg, own, rt.device, channels_last=rt.channels_last)
    test = load_split(cfg, "test", progress=False)
    meta_test_feats = extract_features(model.backbone, test, cfg, rt, progress=False)

    clf = FewShotClassifier.from_checkpoint(own, device="cpu")
    assert clf.runtime.precision == precision
    images = [test.image(i) for i in range(len(test))]  # the same pixels as the meta-test's
    predict_feats = clf.embed(images)
    assert predict_feats.dtype == torch.float32 and predict_feats.shape == meta_test_feats.shape
    assert torch.equal(predict_feats, meta_test_feats.cpu())
    if precision == "bf16":  # the precision is applied, not ignored
        fp32 = FewShotClassifier(clf.backbone, clf.cfg, replace(clf.runtime, precision="fp32"))
        assert not torch.equal(fp32.embed(images), predict_feats)
