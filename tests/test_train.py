"""End-to-end training and testing on tiny generated data, and the seed's commands verbatim."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from negmargin import cli, runtime
from negmargin.config import load_config
from negmargin.errors import NonFiniteLossError
from negmargin.runtime import resolve
from negmargin.train import run

from .helpers import REPO, run_cli, tiny_raw, write_config


def test_tiny_run_writes_every_output_and_test_reads_it(tiny_cfg, tmp_path, capsys, monkeypatch):
    malloc_calls = []  # train.cpu_malloc="retain" (the default) on a CPU: each run sets it once
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda retain=True: malloc_calls.append(retain))
    cfg = tiny_cfg()
    summary = run(cfg, tmp_path / "wd", progress=False)
    assert malloc_calls == [True]
    wd = tmp_path / "wd"
    for name in ("best_accuracy_mean.pth", "latest.pth", "epoch_1.pth", "epoch_2.pth", "tiny.py"):
        assert (wd / name).is_file(), name
    ckpt = torch.load(wd / "best_accuracy_mean.pth", weights_only=True)  # plain data only
    assert ckpt["format"] == "negmargin-checkpoint" and ckpt["config"]["model"]["margin"] == -0.01
    assert set(ckpt) >= {"model", "optimizer", "epoch", "iteration", "best_score", "rng", "val_episodes"}
    assert ckpt["best_score"] == summary["best_accuracy_mean"] and ckpt["val_episodes"].shape == (10, 5, 6)
    records = [json.loads(line) for line in next(wd.glob("*.log.json")).read_text().splitlines()]
    train_rec = [r for r in records if r["mode"] == "train"]
    val_rec = [r for r in records if r["mode"] == "val"]
    assert {"epoch", "iter", "lr", "loss", "accuracy", "time", "data_time", "memory"} <= set(train_rec[0])
    # peak resident memory in MiB: a training process holds at least torch itself (> 100 MiB)
    assert all(100 < r["memory"] < 64 * 2**10 for r in train_rec)
    assert [r["epoch"] for r in val_rec] == [1, 2] and all(0 <= r["accuracy_mean"] <= 100 for r in val_rec)
    assert all(math.isfinite(r["loss"]) for r in train_rec)
    assert "Epoch(val) [2]" in next(wd.glob("*.log")).read_text()
    assert "; cpu_malloc retain; " in next(wd.glob("*.log")).read_text()
    # the dumped config is the resolved one (derived values explicit) and reloads as is
    dumped = load_config(wd / "tiny.py")
    assert dumped.to_dict() == resolve(cfg, num_classes=10)[0].to_dict()
    assert (dumped.model.num_classes, dumped.data.test_resize, dumped.val.steps, dumped.meta_test.steps) == (
        10,
        36,
        150,
        150,
    )
    assert (dumped.train.device, dumped.train.precision) == ("cpu", "fp32")

    config = write_config(tmp_path / "tiny.py", cfg.to_dict())
    code = cli.test_main(
        [
            str(config),
            str(wd / "best_accuracy_mean.pth"),
            "--work-dir",
            str(wd),
            "--quiet",
            "--shots",
            "1",
            "5",
            "--show-task-results",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and malloc_calls == [True, True]
    assert "accuracy_mean:" in out and "95% confidence interval" in out and "task 19: accuracy" in out
    res1 = json.loads(next(wd.glob("meta_test_test_5way-1shot_*.json")).read_text())
    res5 = json.loads(next(wd.glob("meta_test_test_5way-5shot_*.json")).read_text())
    assert res1["n_episodes"] == 20 and len(res1["episode_accuracies"]) == 20 and res5["steps"] == 600
    assert res1["accuracy_mean"] == pytest.approx(np.mean(res1["episode_accuracies"]), abs=1e-3)
    assert res1["accuracy_mean"] > 20 + 10  # well above chance even after two tiny epochs
    assert list((wd / "features").glob("test-*.pt"))  # features cached by checkpoint content


def test_feature_cache_is_reused(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg(train={"epochs": 1})
    wd = tmp_path / "wd"
    run(cfg, wd, progress=False)
    config = write_config(tmp_path / "tiny.py", cfg.to_dict())
    args = [str(config), str(wd / "best_accuracy_mean.pth"), "--work-dir", str(wd), "--quiet"]
    assert cli.test_main(args) == 0
    first = capsys.readouterr().out
    assert cli.test_main(args) == 0
    second = capsys.readouterr().out
    assert "loaded from cache" in second and "loaded from cache" not in first
    assert first.split("accuracy_mean:")[1].split()[0] == second.split("accuracy_mean:")[1].split()[0]


def test_deterministic_runs_give_identical_losses(tiny_cfg, tmp_path):
    """--deterministic with a fixed seed on CPU: identical losses for the first 50 iterations."""
    cfg = tiny_cfg(
        train={"epochs": 4, "batch_size": 8, "log_interval": 1, "deterministic": True, "workers": 2},
        val={"interval": 100},
    )
    losses = []
    for k in range(2):
        run(cfg, tmp_path / f"r{k}", progress=False)
        recs = [json.loads(x) for x in next((tmp_path / f"r{k}").glob("*.log.json")).read_text().splitlines()]
        losses.append([r["loss"] for r in recs if r["mode"] == "train"])
    assert len(losses[0]) >= 50 and losses[0][:50] == losses[1][:50]


def test_non_finite_loss_stops_with_iteration_and_last_checkpoint(tiny_cfg, tmp_path):
    # A sane first epoch, then an absurd learning rate from epoch 2 on.
    cfg = tiny_cfg(train={"epochs": 3, "milestones": [1], "gamma": 1e35}, val={"interval": 5})
    with pytest.raises(NonFiniteLossError) as err:
        run(cfg, tmp_path / "wd", progress=False)
    msg = str(err.value)
    assert "at epoch 2, iteration" in msg and f"Last good checkpoint: {tmp_path / 'wd' / 'latest.pth'}" in msg
    for path in (tmp_path / "wd").glob("*.pth"):
        ckpt = torch.load(path, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def make_cub_layout(root: Path, per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    names = (Path(__file__).parent / "data" / "cub_classes.txt").read_text().split()
    for c, name in enumerate(names):
        folder = root / "data" / "CUB_200_2011" / "images" / name
        folder.mkdir(parents=True)
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 25, (75, 100, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / f"{name.split('.')[1]}_{i:04d}_{c}.jpg", quality=90)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_seed_commands_verbatim_on_a_generated_cub_layout(tmp_path):
    """The two commands of the seed README, run as written from a clone with data/CUB_200_2011."""
    make_cub_layout(tmp_path)
    (tmp_path / "tools").symlink_to(REPO / "tools")
    (tmp_path / "configs").symlink_to(REPO / "configs")
    config = "configs/classification/neg_margin/cub/neg-margin_cosine_conv4_1xb64_cub_5way-1shot.py"
    shrink = [
        "--cfg-options",
        "train.epochs=1",
        "train.warmup_iters=2",
        "data.train_store_size=64",
        "val.n_query=2",
        "meta_test.n_query=2",
        "meta_test.n_episodes=50",
        "train.workers=0",
    ]
    env = {"NEGMARGIN_CACHE_DIR": str(tmp_path / "cache")}
    train = run_cli(["./tools/classification/train.py", config, *shrink], cwd=tmp_path, env=env)
    assert train.returncode == 0, train.stderr[-3000:]
    ckpt = "work_dir/neg-margin_cosine_conv4_1xb64_cub_5way-1shot/best_accuracy_mean.pth"
    assert (tmp_path / ckpt).is_file()
    test = run_cli(["./tools/classification/test.py", config, ckpt, *shrink], cwd=tmp_path, env=env)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "accuracy_mean:" in test.stdout and "accuracy_ci95:" in test.stdout
    assert "100 images" not in test.stdout  # sanity: output is the test summary
    wd = tmp_path / "work_dir/neg-margin_cosine_conv4_1xb64_cub_5way-1shot"
    result = json.loads(next(wd.glob("meta_test_test_5way-1shot_best_accuracy_mean_*.json")).read_text())
    assert result["n_episodes"] == 50 and 0 <= result["accuracy_mean"] <= 100


def test_train_cli_rejects_bad_config_key_in_one_line(tiny_root, tmp_path, capsys):
    raw = tiny_raw(tiny_root, tmp_path / "c", train={"epochs": 1})
    raw["train"]["lr_rate"] = 0.1
    config = write_config(tmp_path / "bad.py", raw)
    assert cli.train_main([str(config), "--work-dir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "train.lr_rate" in err[0]
    assert os.path.exists(config)


def test_demo_command_end_to_end(tmp_path, capsys):
    """`negmargin demo` (the README's first command), on a shrunken demo dataset."""
    code = cli.main(
        [
            "demo",
            "--quiet",
            "--work-dir",
            str(tmp_path / "wd"),
            "--cfg-options",
            f"data.root='{tmp_path / 'demo'}'",
            "data.options={'n_classes': 20, 'n_images': 12, 'split_sizes': (10, 5, 5)}",
            "train.epochs=2",
            "val.n_query=5",
            "meta_test.n_query=5",
            "meta_test.n_episodes=50",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "novel classes, 5-way 1-shot: accuracy_mean" in out and "5-way 5-shot" in out
    assert (tmp_path / "demo" / "train.txt").read_text().count("\n") == 10


def test_validation_embeds_only_the_episodes_images_with_the_full_split_result(tiny_cfg):
    from negmargin.datasets import load_split
    from negmargin.episodes import sample_episodes
    from negmargin.features import extract_features
    from negmargin.meta_test import meta_test_episodes
    from negmargin.model import build_model
    from negmargin.runtime import Runtime
    from negmargin.train import validate

    cfg = tiny_cfg(val={"n_query": 2, "n_episodes": 3})
    val = load_split(cfg, "val", progress=False)
    episodes = sample_episodes(val.labels, 5, 1, 2, 3, 0, val.class_names)
    used = torch.unique(episodes)
    assert len(used) < len(val)  # the case where it matters: a subset of the split
    torch.manual_seed(0)
    model = build_model(cfg, 10)
    cpu = Runtime(torch.device("cpu"), "fp32", channels_last=False)
    sub = validate(model, val, cfg, cpu, episodes, False)
    full = meta_test_episodes(
        extract_features(model.backbone, val, cfg, cpu, progress=False),
        episodes,
        cfg.val,
        cfg.finetune,
        False,
    )
    np.testing.assert_array_equal(sub.accuracies, full.accuracies)
