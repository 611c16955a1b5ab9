"""Every bad input gives a one-line error naming what is wrong, and a non-zero exit code."""

from __future__ import annotations

import os
import pickle
import shutil
from collections import namedtuple

import pytest
import torch

from negmargin import cli
from negmargin.checkpoint import load_checkpoint
from negmargin.errors import CheckpointError
from negmargin.train import run

from .helpers import REPO, run_cli, tiny_raw, write_config


@pytest.fixture(scope="module")
def trained(tiny_root, tmp_path_factory):
    """A tiny trained checkpoint and its config file."""
    from negmargin.config import Config

    tmp = tmp_path_factory.mktemp("errors")
    raw = tiny_raw(tiny_root, tmp / "cache", train={"epochs": 1})
    run(Config.from_dict(raw).validate(), tmp / "wd", progress=False)
    return tmp, raw, write_config(tmp / "tiny.py", raw), tmp / "wd" / "best_accuracy_mean.pth"


def variant(tmp, raw, name, **changes):
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for key, value in changes.items():
        section, field = key.split("__")
        raw[section][field] = value
    return write_config(tmp / f"{name}.py", raw)


CASES = [
    # (id, command, arguments builder, expected message fragment)
    (
        "missing config",
        "train",
        lambda t, r, c, k: [str(t / "nope.py")],
        "config file '{t}/nope.py' does not exist",
    ),
    ("misspelled config", "train", lambda t, r, c, k: [str(t / "tiny_.py")], "did you mean {t}/tiny.py"),
    (
        "unknown key",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "train.epoch=3"],
        "unknown config key 'train.epoch'; did you mean train.epochs",
    ),
    (
        "mistyped value",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "train.lr=fast"],
        "'train.lr' expects a number, got 'fast'",
    ),
    (
        "zero batch",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "train.batch_size=0"],
        "'train.batch_size' must be a positive integer, got 0",
    ),
    (
        "negative epochs",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "train.epochs=-2"],
        "'train.epochs' must be a positive integer, got -2",
    ),
    (
        "zero way",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--n-way", "0"],
        "'meta_test.n_way' must be a positive integer, got 0",
    ),
    (
        "zero shot",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--shots", "0"],
        "argument --shots: must be a positive integer, got 0",
    ),
    (
        "zero steps",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--steps", "0"],
        "argument --steps: must be a positive integer, got 0",
    ),
    (
        "positive margin",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "model.margin=0.05"],
        "'model.margin' must be ≤ 0 for Neg-Margin, got 0.05",
    ),
    (
        "n_way too large",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--n-way", "30"],
        "n_way=30 but the test split has only 5 classes",
    ),
    (
        "too few images per class",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--n-query", "40"],
        "5 class(es) of the test split have fewer than n_shot + n_query = 41 images",
    ),
    (
        "missing data root",
        "train",
        lambda t, r, c, k: [str(c), "--data-root", str(t / "no-data")],
        "dataset root '{t}/no-data' does not exist",
    ),
    (
        "unwritable work dir",
        "train",
        lambda t, r, c, k: [str(c), "--work-dir", str(c / "sub")],
        "cannot write to the work dir '{t}/tiny.py/sub'",
    ),
    (
        "missing checkpoint",
        "test",
        lambda t, r, c, k: [str(c), str(t / "gone.pth")],
        "checkpoint '{t}/gone.pth' does not exist",
    ),
    ("not a checkpoint", "test", lambda t, r, c, k: [str(c), str(c)], "is not a readable PyTorch checkpoint"),
    (
        "other architecture",
        "test",
        lambda t, r, c, k: [str(c), str(k), "--cfg-options", "model.backbone='resnet12'"],
        "holds a conv4 backbone but the config says model.backbone='resnet12'",
    ),
    (
        "unknown backbone",
        "train",
        lambda t, r, c, k: [str(c), "--cfg-options", "model.backbone=vit"],
        "unknown backbone 'vit' (config key model.backbone); valid names: conv4, resnet12",
    ),
]


@pytest.mark.parametrize(("name", "command", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(trained, capsys, name, command, args, expected):
    tmp, raw, config, ckpt = trained
    argv = [*args(tmp, raw, config, ckpt), "--quiet"]
    if command == "train" and "--work-dir" not in argv:
        argv += ["--work-dir", str(tmp / f"wd-{name.replace(' ', '_')}")]
    main = cli.train_main if command == "train" else cli.test_main
    if command == "test":
        argv += ["--work-dir", str(tmp / "test-wd")] if "--work-dir" not in argv else []
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's refusals (the same one-line error, exit 2)
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert expected.format(t=tmp) in err[0]


@pytest.mark.multiprocess
def test_real_exit_code_and_no_traceback(trained):
    tmp, raw, config, ckpt = trained
    done = run_cli(
        [str(REPO / "tools/classification/train.py"), str(config), "--cfg-options", "train.epochz=1"]
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("error: ") and "unknown config key 'train.epochz'; did you mean train.epochs" in last
    )


def test_disk_full_is_reported_before_writing(trained, capsys, monkeypatch):
    tmp, raw, config, ckpt = trained
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    code = cli.train_main([str(config), "--work-dir", str(tmp / "full"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "not enough disk space to write" in err and "MiB free" in err


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# The hand-pickled file uses pickle's protocol 4, which torch's weights-only reader notes
# before refusing it; the refusal is what is checked.
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_that_runs_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "owned"
    evil = Exploit()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"format": "negmargin-checkpoint", "model": evil}, f)
    torch.save({"format": "negmargin-checkpoint", "payload": evil}, tmp_path / "evil2.pth")
    for p in (path, tmp_path / "evil2.pth"):
        with pytest.raises(CheckpointError, match="refusing to load|not a readable"):
            load_checkpoint(p)
    assert not marker.exists()


def test_reference_checkpoint_imports_and_tests(trained, capsys):
    """An mmfewshot-layout checkpoint (backbone./head. keys, meta) loads for testing."""
    tmp, raw, config, ckpt = trained
    ours = torch.load(ckpt, weights_only=True)
    state = {f"{k}": v for k, v in ours["model"].items()}
    state.update({"meta_test_head.weight": torch.zeros(5, 256)})
    reference = {
        "meta": {"epoch": 1, "iter": 7, "mmcv_version": "1.3.12", "config": "model = dict(...)"},
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": []},
    }
    path = tmp / "mmfewshot_epoch_1.pth"
    torch.save(reference, path)
    imported = load_checkpoint(path)
    assert (
        imported["backbone"] == "conv4"
        and imported["num_classes"] == 10
        and "meta_test_head.weight" not in imported["model"]
    )
    code = cli.test_main([str(config), str(path), "--work-dir", str(tmp / "imported"), "--quiet"])
    ours_code = cli.test_main([str(config), str(ckpt), "--work-dir", str(tmp / "ours"), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0 and ours_code == 0
    means = [line for line in out.splitlines() if line.startswith("accuracy_mean:")]
    assert len(means) == 2 and means[0] == means[1]  # same weights → same numbers
