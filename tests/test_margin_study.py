"""The margin study's report (bench/study_report.py), in-process: paired differences against
m = 0 and between seeds, from per-item scores; and the runner's command line without data."""

import argparse
import json
import sys

import numpy as np
import pytest

from .helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "bench"))
from margin_study import STUDIES  # noqa: E402
from study_report import write_report  # noqa: E402

N_IMAGES, N_EPISODES = 300, 2000


def _run(out, head, margin, seed, items):
    """A results.json entry whose numbers are those of its items (both checkpoints the same)."""
    name = f"{head}_m{margin:+g}_seed{seed}"
    np.savez_compressed(
        out / "items" / f"{name}.npz", **{f"{w}_{k}": v for w in ("best", "final") for k, v in items.items()}
    )

    def view():
        return {
            "base_accuracy": float(items["base_hits"].mean()),
            "base_ci95": 1.0,
            "novel_1shot": {"mean": float(items["novel_1shot"].mean()), "ci95": 0.4},
            "novel_5shot": {"mean": float(items["novel_5shot"].mean()), "ci95": 0.4},
        }

    return {
        "head": head,
        "margin": margin,
        "seed": seed,
        "temperature": 10.0,
        "tag": "",
        "precision": "bf16",
        "train_seconds": 60.0,
        "images_per_second": 300.0,
        "best_epoch": 10,
        "best_val_1shot": 40.0,
        "checkpoint_epoch": 10,
        "epochs": 10,
        **view(),
        "final": view(),
        "items": f"items/{name}.npz",
    }


def test_report_pairs_runs_against_m0_and_seeds_against_each_other(tmp_path):
    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    (out / "items").mkdir(parents=True)
    # Shared difficulty per episode / image, so paired differences are far tighter than the runs' CIs.
    difficulty = rng.normal(50, 15, N_EPISODES)
    p_image = rng.uniform(0.1, 0.9, N_IMAGES)

    def items(offset_1shot, base_p_shift):
        return {
            "base_hits": 100.0 * (rng.uniform(size=N_IMAGES) < p_image + base_p_shift),
            "novel_1shot": difficulty + offset_1shot + rng.normal(0, 3, N_EPISODES),
            "novel_5shot": difficulty + 15 + rng.normal(0, 3, N_EPISODES),
        }

    # seed 1 trains a better m = 0 model (+0.8); the margin helps by +0.5 at seed 0, +0.1 at seed 1
    scores = {
        ("cosine", 0.0, 0): items(0.0, 0.0),
        ("cosine", 0.0, 1): items(0.8, 0.0),
        ("cosine", -0.05, 0): items(0.5, -0.05),
        ("cosine", -0.05, 1): items(0.9, -0.05),
    }
    runs = [_run(out, head, m, seed, it) for (head, m, seed), it in scores.items()]
    runs[3]["resumed"] = True  # m = -0.05, seed 1: its train time covers only the last part
    args = argparse.Namespace(dataset="mini_imagenet", precision="bf16", tag="", cfg_options=[], combine=None)
    rows = write_report(args, STUDIES["mini_imagenet"], out, runs)
    result = json.loads((out / "results.json").read_text())
    assert result["rows"] == rows and result["runs"] == runs

    def delta(a, b, key):
        return float((scores[a][key] - scores[b][key]).mean())

    pairs = {p["seed"]: p for p in result["paired"]}
    assert sorted(pairs) == [0, 1]  # only the m = -0.05 runs; m = 0 is the reference
    for seed in (0, 1):
        want = delta(("cosine", -0.05, seed), ("cosine", 0.0, seed), "novel_1shot")
        assert abs(pairs[seed]["final_novel_1shot_delta"] - want) < 1e-6
        assert pairs[seed]["final_novel_1shot_ci95"] < 0.3  # paired: the shared difficulty cancels
    assert abs(pairs[0]["final_novel_1shot_delta"] - 0.5) < 0.3
    assert abs(pairs[1]["final_novel_1shot_delta"] - 0.1) < 0.3

    seeds = {s["margin"]: s for s in result["between_seeds"]}
    assert sorted(seeds) == [-0.05, 0.0] and all(
        s["seed"] == 1 and s["reference_seed"] == 0 for s in seeds.values()
    )
    d = {m: delta(("cosine", m, 1), ("cosine", m, 0), "novel_1shot") for m in (0.0, -0.05)}
    assert abs(seeds[0.0]["final_novel_1shot_delta"] - d[0.0]) < 1e-6
    assert abs(seeds[0.0]["final_novel_1shot_delta"] - 0.8) < 0.3

    md = (out / "results.md").read_text()
    rows_md = {line.split(" | ")[0]: line for line in md.splitlines() if " min" in line}  # the best-val table
    assert "[10, 10] | 1.0 min (resumed) | 300 |" in rows_md["| cosine T=10 m=-0.05"]
    assert "[10, 10] | 1.0 min | 300 |" in rows_md["| cosine T=10 m=0"]
    mean = (pairs[0]["final_novel_1shot_delta"] + pairs[1]["final_novel_1shot_delta"]) / 2
    sd = abs(pairs[0]["final_novel_1shot_delta"] - pairs[1]["final_novel_1shot_delta"]) / np.sqrt(2)
    assert "| cosine T=10 m=-0.05 | mean of 2 |" in md
    assert f"**{mean:+.2f}** (sd {sd:.2f})" in md
    assert "| cosine T=10 m=0 | 1 − 0 |" in md
    # the commands that reproduce the runs, one per seed, the settings by their --list index
    assert "mini_imagenet --data-root DATA/mini_imagenet --only 0 1\n" in md
    assert "mini_imagenet --data-root DATA/mini_imagenet --seeds 1 --only 0 1\n" in md
    noise = np.sqrt((d[0.0] ** 2 + d[-0.05] ** 2) / 2 / 2)
    assert f"novel 1-shot {noise:.2f}" in md


@pytest.mark.multiprocess
def test_study_skips_cleanly_without_its_data(tmp_path):
    done = run_cli(
        [
            str(REPO / "bench/margin_study.py"),
            "mini_imagenet",
            "--data-root",
            str(tmp_path / "absent"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "skipping" in done.stdout and not (tmp_path / "out").exists()


@pytest.mark.multiprocess
def test_study_asks_for_its_data_root(tmp_path):
    done = run_cli([str(REPO / "bench/margin_study.py"), "mini_imagenet", "--out", str(tmp_path / "out")],
                   env={"NEGMARGIN_DATA": ""})  # fmt: skip
    assert done.returncode == 2 and "--data-root" in done.stderr and not (tmp_path / "out").exists()


def test_runs_recorded_without_a_temperature_pair_with_new_ones(tmp_path, monkeypatch):
    """Earlier Omniglot runs stored no temperature; a new run stores the config's 10.0. On load
    they get their setting's (the softmax Baseline's T = 1) or the config's, and the report works."""
    import margin_study

    rng = np.random.default_rng(1)
    out = tmp_path / "out"
    (out / "items").mkdir(parents=True)
    difficulty = rng.normal(50, 15, N_EPISODES)
    items = {"base_hits": 100.0 * (rng.uniform(size=N_IMAGES) < 0.8), "novel_5shot": difficulty + 15}
    runs = []
    for head, margin, temperature, offset in (
        ("cosine", 0.0, None, 0),
        ("softmax", 0.0, None, 3),
        ("cosine", -0.05, 10.0, 1),
    ):
        run = _run(out, head, margin, 0, items | {"novel_1shot": difficulty + offset})
        runs.append(run | {"temperature": temperature})
    (out / "results.json").write_text(json.dumps({"runs": runs}))
    monkeypatch.setattr(sys, "argv", ["margin_study.py", "omniglot", "--report-only", "--out", str(out)])
    margin_study.main()
    result = json.loads((out / "results.json").read_text())
    assert [r["temperature"] for r in result["runs"]] == [10.0, 1.0, 10.0]
    pairs = {p["head"] + str(p["margin"]): p for p in result["paired"]}
    assert pairs["cosine-0.05"]["final_novel_1shot_delta"] == pytest.approx(1.0)
    assert pairs["softmax0.0"]["final_novel_1shot_delta"] == pytest.approx(3.0)


@pytest.mark.parametrize(
    "deltas, base, want",
    [
        ([0.6, 0.9, 0.7], [-0.5, -0.2, -0.4], "gain"),
        ([0.6, 0.9, 0.7], [0.5, 0.2, 0.4], "gain on novel, but base accuracy higher too"),
        ([-0.6, -0.9, -0.7], [0, 0, 0], "cost"),
        ([0.9, 0.8, -0.1], [0, 0, 0], "no effect larger than 1.10"),  # a seed against: 2 × sd 0.551
        ([0.2, 0.1, 0.3], [0, 0, 0], "no effect larger than 0.50"),  # tight but small: the floor
        ([-0.8], [0.0], "cost (one seed)"),
    ],
)
def test_the_decision_rule(deltas, base, want):
    from study_report import verdict

    assert verdict(deltas, base) == want


def test_verdicts_pair_runs_with_m0_of_their_seed_and_temperature():
    from study_report import seed_verdicts

    def run(margin, seed, temperature, novel, base):
        view = {"novel_1shot": {"mean": novel}, "base_accuracy": base}
        return {
            "head": "cosine",
            "margin": margin,
            "seed": seed,
            "temperature": temperature,
            "tag": "",
            "final": view,
        }

    results = [run(0.0, 0, 10.0, 90.0, 80.0), run(0.0, 1, 10.0, 91.0, 81.0), run(0.0, 0, 30.0, 95.0, 85.0),
               run(-0.05, 0, 10.0, 91.0, 79.0), run(-0.05, 1, 10.0, 91.8, 80.0), run(-0.05, 0, 30.0, 94.0, 84.0),
               {"head": "softmax", "margin": 0.0, "seed": 0, "temperature": 1.0, "tag": "", "final": {}}]  # fmt: skip
    rows = {(v["temperature"], v["margin"]): v for v in seed_verdicts(results)}
    assert set(rows) == {(10.0, -0.05), (30.0, -0.05)}
    assert rows[10.0, -0.05]["novel_1shot_deltas"] == pytest.approx([1.0, 0.8])
    assert rows[10.0, -0.05]["base_deltas"] == pytest.approx([-1.0, -1.0])
    assert rows[10.0, -0.05]["verdict"] == "gain"
    assert rows[30.0, -0.05]["verdict"] == "cost (one seed)"
