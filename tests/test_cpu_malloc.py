"""train.cpu_malloc="retain": glibc keeps freed memory, so large blocks stop costing page faults,
and training computes exactly the same numbers as with glibc's defaults.

The allocator is measured in fresh processes: once a heap holds a large free block, malloc
reuses it whatever the setting, so the pytest process (whose earlier tests resolved CPU runs)
cannot show glibc's defaults any more."""

from __future__ import annotations

import json

import pytest
import torch

from negmargin import runtime
from negmargin.config import Config
from negmargin.errors import ConfigError
from negmargin.runtime import Runtime, configure_process

from .helpers import run_cli

glibc_only = pytest.mark.skipif(runtime._glibc() is None, reason="mallopt is glibc's")

FAULTS = """
import json, resource, torch
from negmargin.runtime import retain_freed_memory

def faults_per_block(n):
    # 64 MB: above glibc's largest mmap threshold (32 MB), so by default every block is a
    # fresh mapping whose pages fault in when written (16,384 faults of 4 KB).
    out = []
    for _ in range(n):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(16 * 2**20).fill_(1.0)
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return out

system = faults_per_block(6)  # glibc's defaults: nothing set yet in this process
applied = retain_freed_memory(True)
print(json.dumps({"system": system, "retained": faults_per_block(14), "applied": applied}))
"""

STEPS = """
import sys, torch, torch.nn.functional as F
from negmargin.config import Config
from negmargin.model import build_model
from negmargin.runtime import retain_freed_memory

if sys.argv[2] == "retain":
    assert retain_freed_memory(True)
# Three SGD steps of Conv4 at batch 64, 84x84: first-block activations of 116 MB each.
torch.manual_seed(0)
model = build_model(Config.from_dict({"model": {"num_classes": 10}}).validate(), 10)
model = model.to(memory_format=torch.channels_last)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
gen = torch.Generator().manual_seed(1)
for _ in range(3):
    x = torch.randn(64, 3, 84, 84, generator=gen).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,), generator=gen)
    logits, _ = model(x, y)
    loss = F.cross_entropy(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
state = {f"model.{k}": v for k, v in model.state_dict().items()}
state.update({f"momentum.{i}": s["momentum_buffer"] for i, s in enumerate(opt.state.values())})
torch.save(state, sys.argv[1])
"""


@glibc_only
def test_retaining_freed_memory_removes_the_page_faults_of_large_blocks():
    out = run_cli(["-c", FAULTS], timeout=120)
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert counts["applied"]
    # Every default block faults (≥ one fault per 2 MB even with transparent huge pages).
    assert min(counts["system"]) >= 32, counts
    # Retained: the first blocks grow the heap (one to three of them here, varying from run to
    # run with where glibc splits its aligned blocks); then the same pages serve every block.
    assert sum(counts["retained"][-4:]) * 10 <= sum(counts["system"][-4:]), counts


@glibc_only
def test_training_is_bit_identical_with_retained_memory(tmp_path):
    # Reused pages hold stale values where fresh ones are zero: a kernel that read memory it
    # had not written would show here.
    states = {}
    for mode in ("system", "retain"):
        out = run_cli(["-c", STEPS, str(tmp_path / f"{mode}.pt"), mode], timeout=300)
        assert out.returncode == 0, out.stderr
        states[mode] = torch.load(tmp_path / f"{mode}.pt")
    system, retained = states["system"], states["retain"]
    assert len(system) > 20 and system.keys() == retained.keys()
    assert not any(
        torch.equal(system[k], torch.zeros_like(system[k])) for k in system if k.startswith("momentum")
    )
    assert all(torch.equal(system[k], retained[k]) for k in system)


@pytest.mark.parametrize(
    ("setting", "device", "called"),
    [("retain", "cpu", True), ("system", "cpu", False), ("retain", "cuda", False)],
)
def test_runs_set_the_allocator_only_on_a_cpu_when_asked(monkeypatch, setting, device, called):
    calls = []
    monkeypatch.setattr(runtime, "retain_freed_memory", lambda retain=True: calls.append(retain) or True)
    cfg = Config.from_dict({"train": {"cpu_malloc": setting}}).validate()
    configure_process(cfg, Runtime(torch.device(device), "fp32", True))
    assert calls == ([True] if called else [])


def test_cpu_malloc_rejects_unknown_values():
    with pytest.raises(ConfigError, match="cpu_malloc"):
        Config.from_dict({"train": {"cpu_malloc": "keep"}}).validate()
