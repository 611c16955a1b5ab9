"""torchrun (PyTorch DDP) on CPU with the gloo backend, 2 processes."""

from __future__ import annotations

import json
import os
import socket
import time

import numpy as np
import pytest
import torch

from negmargin.loader import EpochSampler

from .helpers import REPO, run_cli, tiny_raw, write_config

pytestmark = pytest.mark.multiprocess  # starts other processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *args: str, env: dict | None = None):
    return run_cli(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(REPO / "tools/classification" / script),
            *args,
            "--launcher",
            "pytorch",
            "--quiet",
        ],
        env={"OMP_NUM_THREADS": "1", **(env or {})},
        timeout=300,
    )


@pytest.mark.parametrize(("n", "batch", "world"), [(120, 8, 2), (121, 8, 2), (50, 4, 3), (7, 16, 2)])
def test_ranks_see_disjoint_samples_that_cover_the_split(n, batch, world):
    for epoch in range(3):
        shares = [
            set(EpochSampler(n, batch, seed=0, rank=r, world=world).indices(epoch).tolist())
            for r in range(world)
        ]
        assert set().union(*shares) == set(range(n))
        assert all(not (shares[a] & shares[b]) for a in range(world) for b in range(a + 1, world))
        iterations = {EpochSampler(n, batch, 0, r, world).iterations for r in range(world)}
        assert len(iterations) == 1  # every rank runs the same number of steps
    one = EpochSampler(120, 8, 0)
    assert not np.array_equal(one.indices(0), one.indices(1))  # reshuffled each epoch


@pytest.fixture(scope="module")
def ddp_run(tiny_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    config = write_config(tmp / "tiny.py", tiny_raw(tiny_root, tmp / "cache", train={"epochs": 2}))
    done = torchrun("train.py", str(config), "--work-dir", str(tmp / "wd"), "--deterministic")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, config, done


def test_two_process_training_writes_one_set_of_outputs(ddp_run):
    tmp, config, done = ddp_run
    wd = tmp / "wd"
    assert sorted(p.name for p in wd.glob("*.pth")) == [
        "best_accuracy_mean.pth",
        "epoch_1.pth",
        "epoch_2.pth",
        "latest.pth",
    ]
    assert len(list(wd.glob("*.log"))) == 1 and len(list(wd.glob("*.log.json"))) == 1
    log = next(wd.glob("*.log")).read_text()
    assert "device cpu (" in log and "2 process(es)" in log and "8 images per process" in log  # 16 over 2
    assert done.stdout.count("best val accuracy_mean") == 1  # only rank 0 reports
    test = run_cli(
        [
            str(REPO / "tools/classification/test.py"),
            str(config),
            str(wd / "best_accuracy_mean.pth"),
            "--work-dir",
            str(tmp / "single"),
            "--quiet",
        ]
    )
    assert test.returncode == 0 and "accuracy_mean:" in test.stdout


def test_distributed_meta_test_equals_single_process(ddp_run):
    tmp, config, _ = ddp_run
    ckpt = str(tmp / "wd" / "best_accuracy_mean.pth")
    dist = torchrun("test.py", str(config), ckpt, "--work-dir", str(tmp / "t2"), "--shots", "1", "5")
    assert dist.returncode == 0, dist.stderr[-3000:]
    single = run_cli(
        [
            str(REPO / "tools/classification/test.py"),
            str(config),
            ckpt,
            "--work-dir",
            str(tmp / "t1"),
            "--quiet",
            "--shots",
            "1",
            "5",
        ],
        env={"OMP_NUM_THREADS": "1"},
    )
    assert single.returncode == 0, single.stderr[-3000:]
    for shot in (1, 5):
        a = json.loads(next((tmp / "t1").glob(f"meta_test_test_5way-{shot}shot_*.json")).read_text())
        b = json.loads(next((tmp / "t2").glob(f"meta_test_test_5way-{shot}shot_*.json")).read_text())
        assert a["episode_accuracies"] == b["episode_accuracies"]
        assert (a["accuracy_mean"], a["accuracy_ci95"]) == (b["accuracy_mean"], b["accuracy_ci95"])


def test_resume_under_torchrun_after_a_kill(ddp_run):
    tmp, config, _ = ddp_run
    wd = tmp / "killed"
    killed = torchrun(
        "train.py",
        str(config),
        "--work-dir",
        str(wd),
        "--deterministic",
        env={"NEGMARGIN_KILL_AT": "iter:12"},
    )
    assert killed.returncode != 0 and (wd / "latest.pth").is_file()
    resumed = torchrun("train.py", str(config), "--work-dir", str(wd), "--deterministic", "--auto-resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp / "wd" / "latest.pth", weights_only=True)
    b = torch.load(wd / "latest.pth", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_a_failing_rank_stops_the_job_instead_of_hanging(ddp_run):
    tmp, config, _ = ddp_run
    start = time.time()
    done = torchrun(
        "train.py",
        str(config),
        "--work-dir",
        str(tmp / "dead"),
        env={"NEGMARGIN_KILL_AT": "iter:3", "NEGMARGIN_KILL_RANK": "1", "NEGMARGIN_DIST_TIMEOUT": "60"},
    )
    assert done.returncode != 0
    assert time.time() - start < 120
    assert "failed" in done.stderr.lower() or "error" in done.stderr.lower()
    assert os.path.isdir(tmp / "dead")
