"""Prediction people can trust: every bad value refused in one line, no silent wrong answer.

One table for the CLI (exit code 2, one ``error:`` line naming the argument or file,
no traceback, nothing written) and one for the Python API (a UserError with the
same words); then the behaviours: labels in the user's type, sub-folders, what is
skipped is said, bad queries skippable, open set, top-k, embedding once.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys

import pytest
import torch

from negmargin import cli
from negmargin.errors import UserError
from negmargin.predict import FewShotClassifier

from .helpers import REPO, tiny_raw


@pytest.fixture(scope="module")
def setup(model_and_images):
    """The shared tiny checkpoint with support/ (3 images × 5 novel classes) and query/ folders,
    plus a text file posing as a checkpoint and a file to put an --out "under"."""
    tmp = model_and_images[0]
    (tmp / "text.pth").write_text("not a checkpoint\n")
    (tmp / "a_file").write_text("x")
    return tmp


def invoke(argv: list[str], capsys) -> tuple[int, list[str], str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out


NO_CUDA = not torch.cuda.is_available()

# (id, extra arguments, expected fragment of the one error line); {t} is the fixture folder
PREDICT_CASES = [
    ("steps 0", ["--steps", "0"], "argument --steps: must be a positive integer, got 0"),
    ("steps negative", ["--steps", "-5"], "argument --steps: must be a positive integer, got -5"),
    ("steps not a number", ["--steps", "many"], "argument --steps: expected a number, got 'many'"),
    ("top-k 0", ["--top-k", "0"], "argument --top-k: must be a positive integer, got 0"),
    ("top-k negative", ["--top-k", "-1"], "argument --top-k: must be a positive integer, got -1"),
    ("batch-size 0", ["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    ("unknown-below 0", ["--unknown-below", "0"], "argument --unknown-below: must be a probability"),
    ("unknown-below 1.5", ["--unknown-below", "1.5"], "argument --unknown-below: must be a probability"),
    ("unknown-below text", ["--unknown-below", "high"], "argument --unknown-below: expected a number"),
    ("malformed device", ["--device", "gpu0"], "device 'gpu0' is not a device name"),
    ("other device type", ["--device", "meta"], "device 'meta' is not supported"),
    (
        "text checkpoint",
        ["--checkpoint", "{t}/text.pth"],
        "'{t}/text.pth' is not a readable PyTorch checkpoint",
    ),
    ("out under a file", ["--out", "{t}/a_file/p.csv"], "cannot write --out '{t}/a_file/p.csv'"),
    ("out is a folder", ["--out", "{t}/query"], "--out '{t}/query' is a folder"),
    ("missing query", ["--query", "{t}/nope.jpg"], "query '{t}/nope.jpg' does not exist"),
    ("query without images", ["--query", "{t}/wd"], "no query images found in {t}/wd"),
    ("missing support", ["--support", "{t}/nope"], "support folder '{t}/nope' does not exist"),
    ("missing config", ["--config", "{t}/nope.py"], "config file '{t}/nope.py' does not exist"),
    ("missing checkpoint", ["--checkpoint", "{t}/gone.pth"], "checkpoint '{t}/gone.pth' does not exist"),
]
if NO_CUDA:
    PREDICT_CASES.append(
        ("cuda absent", ["--device", "cuda"], "device 'cuda' was asked for but CUDA is not available")
    )


@pytest.mark.parametrize(("name", "extra", "expected"), PREDICT_CASES, ids=[c[0] for c in PREDICT_CASES])
def test_predict_refuses_bad_values_in_one_line(setup, capsys, name, extra, expected):
    t = setup
    argv = {
        "--checkpoint": str(t / "wd/best_accuracy_mean.pth"),
        "--support": str(t / "support"),
        "--query": str(t / "query"),
        "--device": "cpu",
        "--out": str(t / "out" / f"{name}.csv"),
    }
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value.format(t=t)
    code, err, _ = invoke(["predict", *[x for kv in argv.items() for x in kv]], capsys)
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert expected.format(t=t) in err[0], err
    assert not (t / "out" / f"{name}.csv").exists()  # nothing written


EMBED_CASES = [
    ("batch-size 0", ["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    ("malformed device", ["--device", "cuda:x"], "device 'cuda:x' is not a device name"),
    ("text checkpoint", ["--checkpoint", "{t}/text.pth"], "is not a readable PyTorch checkpoint"),
    ("out under a file", ["--out", "{t}/a_file/f.npz"], "cannot write --out '{t}/a_file/f.npz'"),
    ("missing config", ["--config", "{t}/nope.py"], "config file '{t}/nope.py' does not exist"),
    ("missing image", ["--extra-path", "{t}/nope.jpg"], "image '{t}/nope.jpg' does not exist"),
]


@pytest.mark.parametrize(("name", "extra", "expected"), EMBED_CASES, ids=[c[0] for c in EMBED_CASES])
def test_embed_refuses_bad_values_in_one_line(setup, capsys, name, extra, expected):
    t = setup
    argv = {
        "--checkpoint": str(t / "wd/best_accuracy_mean.pth"),
        "--device": "cpu",
        "--out": str(t / f"{name}.npz"),
    }
    for flag, value in zip(extra[::2], extra[1::2]):
        argv[flag] = value.format(t=t)
    paths = [str(t / "query")] + ([argv.pop("--extra-path")] if "--extra-path" in argv else [])
    code, err, _ = invoke(["embed", *paths, *[x for kv in argv.items() for x in kv]], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=t) in err[0], err
    assert not (t / f"{name}.npz").exists()


@pytest.mark.parametrize("device", ["gpu0", *(["cuda"] if NO_CUDA else [])])
@pytest.mark.parametrize("tool", ["train", "test"])
def test_train_and_test_refuse_an_absent_or_malformed_device(setup, capsys, tool, device):
    t = setup
    config = t / "tiny.py"
    if not config.exists():
        from .helpers import write_config

        write_config(config, tiny_raw(REPO, t / "cache"))
    args = [str(config)] + ([str(t / "wd/best_accuracy_mean.pth")] if tool == "test" else [])
    main = cli.train_main if tool == "train" else cli.test_main
    code = main([*args, "--device", device, "--work-dir", str(t / f"wd-{tool}-{device}"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and f"device '{device}'" in err[0], (
        err
    )


def test_api_refuses_the_same_values_with_the_same_words(setup):
    t = setup
    clf = FewShotClassifier.from_checkpoint(t / "wd/best_accuracy_mean.pth", device="cpu")
    support = sorted((t / "support").rglob("*.png"))
    labels = [p.parent.name for p in support]
    cases = [
        (lambda: clf.fit(support, labels, steps=0), "steps must be a positive integer, got 0"),
        (lambda: clf.fit(support, labels, steps=-5), "steps must be a positive integer, got -5"),
        (lambda: clf.fit(support, [[x] for x in labels]), "labels must be hashable"),
        (lambda: clf.fit(support[:2], labels[:1]), "2 images but 1 labels"),
        (lambda: clf.predict(support[:1]), "call fit() (or fit_folder())"),
        (lambda: clf.embed(support, batch_size=0), "batch_size must be a positive integer, got 0"),
        (lambda: FewShotClassifier.from_checkpoint(t / "text.pth"), "is not a readable PyTorch checkpoint"),
        (
            lambda: FewShotClassifier.from_checkpoint(t / "wd/best_accuracy_mean.pth", device="gpu0"),
            "not a device name",
        ),
    ]
    for call, expected in cases:
        with pytest.raises(UserError) as info:
            call()
        assert expected in str(info.value)
    clf.fit(support, labels)
    for call, expected in [
        (lambda: clf.predict(support[:1], unknown_below=1.5), "unknown_below must be a probability"),
        (lambda: clf.predict_rows(support[:1], top_k=0), "top_k must be a positive integer, got 0"),
    ]:
        with pytest.raises(UserError, match=expected):
            call()


def test_labels_come_back_in_the_type_given(setup):
    t = setup
    support = sorted((t / "support").rglob("*.png"))
    names = sorted({p.parent.name for p in support})
    y = [names.index(p.parent.name) for p in support]  # ints, as scikit-learn users pass them
    clf = FewShotClassifier.from_checkpoint(t / "wd/best_accuracy_mean.pth", device="cpu").fit(support, y)
    query = sorted((t / "query").rglob("*.png"))
    pred = clf.predict(query)
    assert all(type(p) is int for p in pred) and clf.classes == sorted(set(y))
    truth = [names.index(p.parent.name) for p in query]
    assert sum(p == q for p, q in zip(pred, truth)) / len(truth) > 0.5  # comparable with y_true: not 0%


def test_support_subfolders_are_read_and_said(setup, tmp_path, capsys):
    t = setup
    support = tmp_path / "support"
    shutil.copytree(t / "support", support)
    first = sorted(support.iterdir())[0]
    (first / "more").mkdir()
    for f in sorted(first.glob("*.png")):
        f.rename(first / "more" / f.name)  # this class's images all in a sub-folder
    (first / ".DS_Store").write_text("x")
    code, err, _ = invoke(
        [
            "predict",
            "--checkpoint",
            str(t / "wd/best_accuracy_mean.pth"),
            "--support",
            str(support),
            "--query",
            str(t / "query"),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    said = [line for line in err if line.startswith("support:")]
    assert said == [
        f"support: 5 classes, 15 images ({', '.join(f'{c.name} 3' for c in sorted(support.iterdir()))}); "
        "3 of them in sub-folders of a class folder"
    ]
    assert any(line.startswith("skipped in the support folder: 1 hidden file(s)") for line in err)


def test_query_folders_skip_only_what_they_say(setup, tmp_path, capsys):
    t = setup
    query = tmp_path / "query"
    shutil.copytree(t / "query", query)
    (query / "notes.txt").write_text("x")
    (query / "deep" / "er").mkdir(parents=True)
    shutil.copy(next((t / "query").rglob("*.png")), query / "deep" / "er" / "nested.png")
    shutil.copy(next((t / "query").rglob("*.png")), query / "photo.jfif")  # a JPEG-family extension
    (query / "bad.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "p.csv"
    base = [
        "predict",
        "--checkpoint",
        str(t / "wd/best_accuracy_mean.pth"),
        "--support",
        str(t / "support"),
        "--query",
        str(query),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    code, err, _ = invoke(base, capsys)
    errors = [line for line in err if "error" in line]  # after the support line and a progress bar
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: ") and "bad.png" in errors[0]
    assert not out.exists() and not any("Traceback" in line for line in err)  # stops, names the file
    code, err, printed = invoke([*base, "--skip-bad-images", "--top-k", "2"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 45 + 2  # 45 + the nested png + the .jfif; bad.png skipped
    assert {"top2_class", "top2_probability"} <= set(rows[0]) and "top3_class" not in rows[0]
    assert any(r["path"].endswith("nested.png") for r in rows)
    assert [line for line in err if "notes.txt" in line] == [
        f"skipped in the query folders: 1 file(s) without an image extension ({query / 'notes.txt'})"
    ]
    assert [line for line in err if "bad.png" in line] == [
        f"skipped in the queries: 1 unreadable image(s) ({query / 'bad.png'})"
    ]
    summary = [line for line in err if line.startswith("classified 47 images: ")]
    assert summary and summary[0].endswith("; 1 unreadable image(s) skipped")
    counts = {
        part.rsplit(" ", 1)[0]: int(part.rsplit(" ", 1)[1])
        for part in summary[0].split(": ", 1)[1].split(";")[0].split(", ")
    }
    assert sum(counts.values()) == 47
    header = printed.splitlines()[0]
    assert "top2" in header and "top3" not in header  # the printed table honours --top-k


def test_unknown_below_labels_low_confidence_queries_unknown(setup, capsys, tmp_path):
    t = setup
    clf = FewShotClassifier.from_checkpoint(t / "wd/best_accuracy_mean.pth", device="cpu").fit_folder(
        t / "support"
    )
    query = sorted((t / "query").rglob("*.png"))
    feats = clf.embed(query)
    proba = clf.proba_of(feats)
    best = proba.max(-1).values
    threshold = float(best.median())
    labels = clf.labels_of(proba, unknown_below=threshold)
    assert labels.count("unknown") == int((best < threshold).sum()) > 0
    assert [lab for lab, p in zip(labels, best) if p >= threshold] == [
        clf.classes[i] for i, p in zip(proba.argmax(-1).tolist(), best) if p >= threshold
    ]
    assert clf.predict(query, unknown_below=threshold) == labels
    out = tmp_path / "p.csv"
    code, err, _ = invoke(
        [
            "predict",
            "--checkpoint",
            str(t / "wd/best_accuracy_mean.pth"),
            "--support",
            str(t / "support"),
            "--query",
            str(t / "query"),
            "--device",
            "cpu",
            "--out",
            str(out),
            "--unknown-below",
            f"{threshold}",
            "--quiet",
        ],
        capsys,
    )
    assert code == 0 and err == []  # --quiet: nothing on stderr
    assert sum(r["predicted"] == "unknown" for r in csv.DictReader(out.open())) == labels.count("unknown")


def test_predict_embeds_each_query_once(setup, monkeypatch):
    t = setup
    clf = FewShotClassifier.from_checkpoint(t / "wd/best_accuracy_mean.pth", device="cpu").fit_folder(
        t / "support"
    )
    seen = []
    forward = clf.backbone.forward
    monkeypatch.setattr(clf.backbone, "forward", lambda x: (seen.append(len(x)), forward(x))[1])
    query = sorted((t / "query").rglob("*.png"))
    rows, _ = clf.predict_rows(query, top_k=3, batch_size=16)
    assert sum(seen) == len(query) == len(rows) and max(seen) <= 16  # --batch-size bounds a forward pass


@pytest.mark.multiprocess
def test_python_dash_m_negmargin_is_the_command(setup):
    t = setup
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "negmargin",
            "predict",
            "--checkpoint",
            str(t / "wd/best_accuracy_mean.pth"),
            "--support",
            str(t / "support"),
            "--query",
            str(t / "query"),
            "--device",
            "cpu",
            "--quiet",
            "--top-k",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout.strip().splitlines()) == 1 + 45 and done.stderr == ""


def test_test_py_refuses_a_text_file_as_checkpoint_in_one_line(setup, capsys):
    t = setup
    config = t / "tiny-text.py"
    if not config.exists():
        from .helpers import write_config

        write_config(config, tiny_raw(REPO, t / "cache"))
    code = cli.test_main([str(config), str(t / "text.pth"), "--work-dir", str(t / "wd-text"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert f"'{t / 'text.pth'}' is not a readable PyTorch checkpoint" in err[0]
