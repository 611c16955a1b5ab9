"""train.precision="auto" follows what the CPU can do; an explicit bf16 where it is emulated warns."""

from __future__ import annotations

import pytest
import torch

from negmargin import runtime
from negmargin.config import Config
from negmargin.runtime import choose_precision, native_bf16, resolve

XEON_AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_AVX2 = frozenset({"avx2", "fma", "sse4_2"})
ARM_BF16 = frozenset({"fp", "asimd", "bf16", "i8mm"})
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    ("flags", "native"), [(XEON_AMX, True), (EPYC_AVX2, False), (ARM_BF16, True), (frozenset(), False)]
)
def test_native_bf16_from_the_cpu_flags(flags, native):
    assert native_bf16(flags) is native


def test_auto_picks_bf16_only_where_it_is_native(capsys):
    assert choose_precision("auto", CPU, XEON_AMX) == "bf16"
    assert choose_precision("auto", CPU, EPYC_AVX2) == "fp32"
    assert choose_precision("auto", CUDA, EPYC_AVX2) == "bf16"
    assert choose_precision("fp32", CPU, XEON_AMX) == "fp32"  # the configs' default is kept
    assert capsys.readouterr().err == ""


def test_explicit_bf16_without_native_support_runs_with_one_warning(capsys):
    assert choose_precision("bf16", CPU, EPYC_AVX2) == "bf16"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: train.precision='bf16'") and "6x slower" in err[0]
    assert choose_precision("bf16", CPU, XEON_AMX) == "bf16"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("flags", "expected"), [(XEON_AMX, "bf16"), (EPYC_AVX2, "fp32")])
def test_resolve_records_the_precision_used(monkeypatch, flags, expected):
    monkeypatch.setattr(runtime, "cpu_info", lambda: ("Test CPU", flags))
    cfg = Config.from_dict({"train": {"precision": "auto", "device": "cpu"}}).validate()
    resolved, rt = resolve(cfg)
    assert rt.precision == expected and resolved.train.precision == expected
    assert runtime.machine_line(rt) == (
        f"device cpu (Test CPU, {'native' if expected == 'bf16' else 'no native'} bf16); precision {expected}"
    )
