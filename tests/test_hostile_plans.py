"""Hostile plans, offsets and ids on every backend, each family in its own subprocess (a crash fails one test,
not the run): a ValueError naming the argument with validation on; with it off, no crash, no unwritten
output (poisoned allocator) and outputs from in-range rows only. The cases live in ``tests/hostile_cases.py``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsemm_kernels.backend import unsupported_reasons

ROOT = Path(__file__).resolve().parent.parent
FAMILIES = {  # family -> (op whose backends it covers)
    "offsets": "grouped_mm",
    "plans": "grouped_mm",
    "ids": "group_plan",
    "norm-ids": "modality_norm",
    "norm-offsets": "modality_norm",
}
PARAMS = [
    pytest.param(family, backend, device, marks=[pytest.mark.gpu] if device == "cuda" else [])
    for family in FAMILIES
    for backend in ("triton", "cpu", "torch", "cuda")
    for device in ("cpu", "cuda")
]


@pytest.mark.parametrize("family, backend, device", PARAMS)
def test_hostile_inputs(family, backend, device):
    dtype = torch.int64 if FAMILIES[family] == "group_plan" else torch.float32
    reasons = unsupported_reasons(FAMILIES[family], backend, torch.device(device), dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "tests.hostile_cases", family, backend, device],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    lines = proc.stdout.splitlines()
    started = [ln[6:] for ln in lines if ln.startswith("START ")]
    failures = [ln for ln in lines if ln.startswith("FAIL ")]
    if proc.returncode < 0 or (proc.returncode and not failures):
        last = started[-1] if started else "(before the first case)"
        pytest.fail(f"the process died (code {proc.returncode}) in case {last!r}:\n{proc.stderr[-3000:]}")
    assert not failures, "\n".join(failures)
    assert len(started) == len([ln for ln in lines if ln.startswith("OK ")]) > 0
