"""Nothing lost, nothing silently wrong: a user's files, results and classes are safe.

One table per rule, through the command line (in-process) and the Python API alike:
each case gives its exit code and one ``error:`` line, and where the user owns files,
they are byte-identical afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from negmargin import cli
from negmargin.checkpoint import load_checkpoint
from negmargin.config import Config
from negmargin.datasets import read_source
from negmargin.datasets.cache import remove_dead_temporaries
from negmargin.datasets.demo import generate
from negmargin.errors import CheckpointError, ConfigError, DataError
from negmargin.fileio import atomic_write_text
from negmargin.predict import FewShotClassifier
from negmargin.train import run

from .helpers import REPO, tiny_raw, write_config

DEMO_CONFIG = REPO / "configs/classification/neg_margin/demo/neg-margin_cosine_conv4_demo_5way-1shot.py"


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path → sha256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_error(capsys, code: int) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("demo data:")]
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    return err[0]


def call(main, argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse refusals
        return int(exc.code or 0)


@pytest.fixture
def photos(tmp_path) -> Path:
    """A user's folder of photos, with their own class lists."""
    root = tmp_path / "my_photos"
    generate(root / "gen", n_classes=6, n_images=4, split_sizes=(4, 1, 1), seed=5, progress=False)
    for c in sorted(p for p in (root / "gen").iterdir() if p.is_dir()):
        shutil.move(str(c), root / c.name)
    shutil.rmtree(root / "gen")
    (root / "train.txt").write_text("class_000\nclass_001\nclass_002\nclass_003\n")
    (root / "val.txt").write_text("class_004\n")
    (root / "test.txt").write_text("class_005\n")
    return root


@pytest.fixture
def trained(tiny_root, tmp_path):
    """A tiny run in its work dir, with its own copy of the data (so a case may change it)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_root, data)
    raw = tiny_raw(data, tmp_path / "cache", train={"epochs": 1})
    run(Config.from_dict(raw).validate(), tmp_path / "wd", progress=False)
    return tmp_path, raw, write_config(tmp_path / "tiny.py", raw), tmp_path / "wd"


# --------------------------------------------------------------------------- 1. what the user owns


def test_demo_never_writes_into_a_users_folder(photos, tmp_path, capsys):
    before = snapshot(photos)
    code = call(
        cli.train_main, [str(DEMO_CONFIG), "--data-root", str(photos), "--work-dir", str(tmp_path / "w")]
    )
    line = one_error(capsys, code)
    assert f"'{photos}' is not empty and was not made by the demo" in line and "data.dataset='folder'" in line
    assert snapshot(photos) == before
    # the demo still writes into a new folder, and again into its own
    generate(tmp_path / "new", n_classes=4, n_images=2, split_sizes=(2, 1, 1), progress=False)
    generate(tmp_path / "new", n_classes=4, n_images=3, split_sizes=(2, 1, 1), progress=False)
    assert "demo data: generating" in capsys.readouterr().err


def test_a_config_without_a_dataset_is_an_error_listing_them(tmp_path, capsys):
    config = write_config(tmp_path / "nodata.py", {"model": {"backbone": "conv4"}})
    line = one_error(capsys, call(cli.train_main, [str(config), "--work-dir", str(tmp_path / "w")]))
    assert (
        "names no dataset" in line and "cub, demo, folder, mini_imagenet, omniglot, tiered_imagenet" in line
    )
    with pytest.raises(ConfigError, match="names no dataset"):
        read_source(Config(), "train")


def test_a_work_dir_holding_a_run_is_resumed_or_refused(trained, capsys):
    tmp, raw, config, wd = trained
    before = snapshot(wd)
    args = [str(config), "--work-dir", str(wd), "--quiet"]
    line = one_error(capsys, call(cli.train_main, args))
    assert (
        f"work dir '{wd}' already holds a run" in line and "--auto-resume" in line and "--overwrite" in line
    )
    assert {k: v for k, v in snapshot(wd).items() if k.endswith(".pth")} == {
        k: v for k, v in before.items() if k.endswith(".pth")
    }
    assert call(cli.train_main, [*args, "--auto-resume"]) == 0  # nothing left to train: resumed, done
    assert call(cli.train_main, [*args, "--overwrite"]) == 0
    assert "removed 3 checkpoint(s) of the earlier run" in capsys.readouterr().out


def test_a_second_process_is_kept_out_of_a_work_dir(trained, capsys):
    tmp, raw, config, wd = trained
    (wd / ".lock").write_text(f"{os.getpid()} {os.uname().nodename} 2026-01-01 00:00:00 train.py x\n")
    line = one_error(capsys, call(cli.train_main, [str(config), "--work-dir", str(wd), "--auto-resume"]))
    assert f"is in use by process {os.getpid()}" in line
    (wd / ".lock").write_text(f"999999999 {os.uname().nodename} 2026-01-01 00:00:00 train.py x\n")  # dead
    assert call(cli.train_main, [str(config), "--work-dir", str(wd), "--auto-resume", "--quiet"]) == 0
    assert not (wd / ".lock").exists()  # released at the end


def test_results_of_different_checkpoints_and_settings_never_replace_each_other(trained):
    tmp, raw, config, wd = trained
    shutil.copy(wd / "epoch_1.pth", wd / "other.pth")
    base = [str(config), "--work-dir", str(wd), "--quiet", "--n-episodes", "20"]
    for ckpt, extra in (
        ("best_accuracy_mean.pth", []),
        ("other.pth", []),
        ("best_accuracy_mean.pth", ["--steps", "5"]),
    ):
        assert call(cli.test_main, [*base[:1], str(wd / ckpt), *base[1:], *extra]) == 0
    files = sorted(wd.glob("meta_test_test_5way-1shot_*.json"))
    assert len(files) == 3
    assert {json.loads(f.read_text())["checkpoint"].split("/")[-1] for f in files} == {
        "best_accuracy_mean.pth",
        "other.pth",
    }
    assert call(cli.test_main, [*base[:1], str(wd / "other.pth"), *base[1:]]) == 0  # the same test again
    assert len(list(wd.glob("meta_test_test_5way-1shot_*.json"))) == 3  # rewrites its own file


# --------------------------------------------------------------------------- 2. never a silently wrong number


def test_meta_testing_refuses_the_classes_a_checkpoint_trained_on(trained, capsys):
    tmp, raw, config, wd = trained
    data = Path(raw["data"]["root"])
    trained_on = load_checkpoint(wd / "best_accuracy_mean.pth")["train_classes"]
    assert trained_on == (data / "train.txt").read_text().split()
    # the split changed after training: a base class moved to the test split
    (data / "train.txt").write_text("\n".join(trained_on[1:]) + "\n")
    (data / "test.txt").write_text(
        "\n".join([trained_on[0], *(data / "test.txt").read_text().split()]) + "\n"
    )
    line = one_error(
        capsys, call(cli.test_main, [str(config), str(wd / "best_accuracy_mean.pth"), "--quiet"])
    )
    assert f"was trained on 1 class(es) of the test split ({trained_on[0]})" in line


def test_a_partial_set_of_class_lists_is_an_error(photos, tmp_path):
    (photos / "test.txt").unlink()
    raw = {"data": {"dataset": "folder", "root": str(photos)}}
    with pytest.raises(DataError, match="has train.txt and val.txt but no test.txt"):
        read_source(Config.from_dict(raw).validate(), "train")


def test_a_class_list_with_a_byte_order_mark_reads(photos):
    (photos / "train.txt").write_bytes(b"\xef\xbb\xbf" + (photos / "train.txt").read_bytes())
    raw = {"data": {"dataset": "folder", "root": str(photos)}}
    assert read_source(Config.from_dict(raw).validate(), "train").class_names[0] == "class_000"


def flip_bytes(path: Path, count: int = 200) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 3  # inside the tensor records, not the zip directory at the end
    for i in range(start, start + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_checkpoint_is_detected_on_load(trained, capsys):
    tmp, raw, config, wd = trained
    bad = wd / "damaged.pth"
    shutil.copy(wd / "best_accuracy_mean.pth", bad)
    flip_bytes(bad)
    line = one_error(capsys, call(cli.test_main, [str(config), str(bad), "--quiet"]))
    assert str(bad) in line and ("damaged" in line or "not a readable PyTorch checkpoint" in line)
    support = Path(raw["data"]["root"])
    code = call(
        cli.main, ["predict", "--checkpoint", str(bad), "--support", str(support), "--query", str(support)]
    )
    assert str(bad) in one_error(capsys, code)
    with pytest.raises(CheckpointError, match="damaged|not a readable"):
        FewShotClassifier.from_checkpoint(bad)


def test_non_finite_weights_are_an_error_not_a_number(trained, capsys):
    tmp, raw, config, wd = trained
    ckpt = load_checkpoint(wd / "best_accuracy_mean.pth")
    name = next(k for k in ckpt["model"] if k.startswith("backbone.") and k.endswith("weight"))
    ckpt["model"][name] = torch.full_like(ckpt["model"][name], float("nan"))
    from negmargin.checkpoint import save_checkpoint

    save_checkpoint(wd / "nan.pth", {k: v for k, v in ckpt.items() if k not in ("format", "format_version",
                                                                                 "negmargin_version", "sha256")})  # fmt: skip
    line = one_error(capsys, call(cli.test_main, [str(config), str(wd / "nan.pth"), "--quiet"]))
    assert "gives non-finite features" in line and "nan.pth" in line
    clf = FewShotClassifier.from_checkpoint(wd / "nan.pth")
    images = [torch.rand(3, 40, 40) for _ in range(4)]
    with pytest.raises(CheckpointError, match="nan.pth' gives non-finite features"):
        clf.fit(images, [0, 0, 1, 1])


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.momentum=1.5", "'train.momentum' must be in [0, 1), got 1.5"),
        ("train.weight_decay=-0.1", "'train.weight_decay' must be in [0, ∞], got -0.1"),
        ("train.gamma=0", "'train.gamma' must be in (0, ∞], got 0"),
        ("train.warmup_ratio=2", "'train.warmup_ratio' must be in (0, 1], got 2"),
        ("train.seed=-1", "'train.seed' must be in [0, 4.29497e+09], got -1"),
        ("augment.flip_prob=2", "'augment.flip_prob' must be in [0, 1], got 2"),
        ("augment.brightness=-0.4", "'augment.brightness' must be in [0, 1], got -0.4"),
        ("finetune.dampening=-1", "'finetune.dampening' must be in [0, 1], got -1"),
        ("finetune.momentum=1", "'finetune.momentum' must be in [0, 1), got 1"),
        ("model.margin=-3", "'model.margin' must be in [-1, 1], got -3"),
        ("meta_test.episode_seed=-2", "'meta_test.episode_seed' must be in [0, 4.29497e+09], got -2"),
        ("data.train_store_size=-5", "'data.train_store_size' must be in [0, ∞], got -5"),
    ],
)
def test_numeric_settings_outside_their_range_are_refused(trained, capsys, override, expected):
    tmp, raw, config, wd = trained
    code = call(
        cli.train_main, [str(config), "--work-dir", str(tmp / "new"), "--quiet", "--cfg-options", override]
    )
    assert expected in one_error(capsys, code)


# --------------------------------------------------------------------------- 3. never drop data without a count


def test_training_reads_class_sub_folders_and_names_what_it_skips(photos):
    nested = photos / "class_000" / "2024-06" / "camera2"
    nested.mkdir(parents=True)
    shutil.copy(next((photos / "class_001").glob("*.png")), nested / "extra.png")
    (photos / "class_000" / "IMG_0001.heic").write_bytes(b"not decoded")
    (photos / "class_000" / ".DS_Store").write_bytes(b"")
    raw = {"data": {"dataset": "folder", "root": str(photos)}}
    train = read_source(Config.from_dict(raw).validate(), "train")
    assert len(train) == 4 * 4 + 1  # the image in a sub-folder counts
    assert "skipped in the class folders: 1 hidden file(s)" in train.layout
    assert "1 file(s) without an image extension" in train.layout and "IMG_0001.heic" in train.layout


# --------------------------------------------------------------------------- 4. one line, never a traceback


def test_a_folder_given_as_the_config_is_named(tmp_path, capsys):
    line = one_error(capsys, call(cli.train_main, [str(tmp_path)]))
    assert f"config '{tmp_path}' is a folder; give a config file" in line


def test_a_write_over_the_file_size_limit_is_one_line(tmp_path):
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000)); "
        "from negmargin.fileio import atomic_write_text; from negmargin.errors import UserError\n"
        "try:\n atomic_write_text(sys.argv[1], 'x' * 5000)\n"
        "except UserError as e:\n print('error:', e); sys.exit(2)"
    )
    target = tmp_path / "big.txt"
    target.write_text("the previous version")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"cannot write '{target}': the file is larger than this system or user allows" in done.stdout
    assert target.read_text() == "the previous version"


def test_dist_train_without_the_process_count_says_how_to_call_it():
    done = subprocess.run(["bash", str(REPO / "tools/classification/dist_train.sh"), "x.py"], capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("error: usage:") and "GPUS" in done.stderr


# --------------------------------------------------------------------------- 5. disk hygiene


def test_what_a_killed_preparation_left_is_removed(tmp_path):
    folder = tmp_path / "cache" / "folder-train-abc"
    dead = folder.with_name(f".{folder.name}.tmp-999999999")
    live = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "images.u8").write_bytes(b"x" * 100)
    remove_dead_temporaries(folder)
    assert not dead.exists() and live.exists()


def test_outputs_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "result.json").stat().st_mode) == 0o644
