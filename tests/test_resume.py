"""Nothing lost: SIGKILL at any point + --auto-resume ends exactly like an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers import REPO, run_cli, tiny_raw, write_config

pytestmark = pytest.mark.multiprocess  # starts other processes

TRAIN = str(REPO / "tools/classification/train.py")


@pytest.fixture(scope="module")
def setup(tiny_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    raw = tiny_raw(
        tiny_root,
        tmp / "cache",
        train={"epochs": 3, "log_interval": 1, "checkpoint_interval": 1},
        val={"interval": 1},
    )
    config = write_config(tmp / "tiny.py", raw)
    reference = tmp / "reference"
    done = run_cli([TRAIN, str(config), "--work-dir", str(reference), "--deterministic", "--quiet"])
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp, config, reference


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("latest.pth", "best_accuracy_mean.pth"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa["best_score"] == wb["best_score"] and wa["epoch"] == wb["epoch"], name
        for key, tensor in wa["model"].items():
            assert torch.equal(tensor, wb["model"][key]), f"{name}: {key} differs"
        for sa, sb in zip(wa["optimizer"]["state"].values(), wb["optimizer"]["state"].values()):
            assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize(
    "point", ["iter:20", "val@2", "write:latest.pth@2", "write:best_accuracy_mean.pth@1"]
)
def test_sigkill_then_auto_resume_equals_uninterrupted(setup, point):
    tmp, config, reference = setup
    wd = tmp / f"killed-{point.replace(':', '_').replace('@', '_')}"
    args = [TRAIN, str(config), "--work-dir", str(wd), "--deterministic", "--quiet"]
    killed = run_cli(args, env={"NEGMARGIN_KILL_AT": point})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not list(wd.glob(".*.tmp")) or point.startswith("write:")  # only a write leaves a temp file
    for path in wd.glob("*.pth"):
        weights(path)  # every checkpoint on disk is complete and loadable
    resumed = run_cli([*args, "--auto-resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(reference, wd)


def test_sigterm_saves_mid_epoch_and_resumes_exactly(setup):
    tmp, config, reference = setup
    wd = tmp / "sigterm"
    args = [TRAIN, str(config), "--work-dir", str(wd), "--deterministic", "--quiet"]
    env = {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**__import__("os").environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        logs = list(wd.glob("*.log.json"))
        if logs and sum(1 for line in logs[0].read_text().splitlines() if '"train"' in line) >= 18:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by signal" in err + out and "--auto-resume" in err + out
    state = weights(wd / "latest.pth")
    assert state["iteration"] > 0 or state["epoch"] > 0
    resumed = run_cli([*args, "--auto-resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_run(reference, wd)
    records = [json.loads(x) for f in wd.glob("*.log.json") for x in f.read_text().splitlines()]
    assert any(r["mode"] == "val" for r in records)


def test_resume_from_explicit_checkpoint_and_config_mismatch(setup, tmp_path):
    tmp, config, reference = setup
    wd = tmp_path / "wd"
    first = run_cli(
        [
            TRAIN,
            str(config),
            "--work-dir",
            str(wd),
            "--deterministic",
            "--quiet",
            "--cfg-options",
            "train.epochs=1",
        ]
    )
    assert first.returncode == 0, first.stderr[-2000:]
    bad = run_cli(
        [
            TRAIN,
            str(config),
            "--work-dir",
            str(wd),
            "--resume-from",
            str(wd / "latest.pth"),
            "--cfg-options",
            "model.backbone=resnet12",
        ]
    )
    assert bad.returncode == 2 and "trained with model.backbone='conv4'" in bad.stderr
    good = run_cli(
        [
            TRAIN,
            str(config),
            "--work-dir",
            str(wd),
            "--deterministic",
            "--quiet",
            "--resume-from",
            str(wd / "latest.pth"),
        ]
    )
    assert good.returncode == 0, good.stderr[-2000:]
    assert_same_run(reference, wd)
