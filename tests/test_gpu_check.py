"""bench/gpu_check.py runs start to finish on a CPU (--smoke), so it cannot rot between GPU runs."""

from __future__ import annotations

import json

import pytest

from .helpers import REPO, run_cli

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_gpu_check_smoke_runs_every_section_and_says_no_gpu_was_measured(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run_cli([str(REPO / "bench/gpu_check.py"), "--smoke", "--device", "cpu", "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NO GPU" in done.stdout and "no GPU row was measured" in done.stdout
    report = json.loads(out.read_text())
    assert report["gpu_measured"] is False and report["smoke"] is True and report["failed"] == []
    sections = {row["section"] for row in report["rows"]}
    assert sections == {"throughput", "schedule", "meta-test", "correctness"}
    names = [row["name"] for row in report["rows"]]
    for backbone in ("conv4", "resnet12"):
        for precision in ("fp32", "bf16"):
            assert any(n.startswith(f"{backbone} {precision}") and "(2) our input path" in n for n in names)
    rates = [row["value"] for row in report["rows"] if row["unit"] == "img/s"]
    assert len(rates) == 9 and all(r > 0 for r in rates)
    correctness = {
        row["name"].split(":")[0]: row for row in report["rows"] if row["section"] == "correctness"
    }
    assert all(row["ok"] for row in correctness.values()) and len(correctness) == 3
    # the CPU kill-and-resume is bit-exact (as tests/test_resume.py asserts); the engine on
    # the "device" (here the CPU again) gives the CPU engine's accuracies
    assert any(row["value"] == "bit-exact" for row in correctness.values())
    assert all("0 episodes differ" in row["note"] for row in report["rows"] if row["section"] == "meta-test")
