"""No host sync on the hot path: a grep over the plan, ops and kernels, and (on GPU) sync-debug mode."""

import pathlib
import re

import pytest
import torch

import sparsemm_kernels as smk

PKG = pathlib.Path(smk.__file__).parent
HOT = [PKG / "plan.py", *sorted((PKG / "ops").glob("*.py")), *sorted((PKG / "kernels").rglob("*.py")),
       *sorted((PKG / "nn").glob("*.py"))]
SYNCING = re.compile(r"\.item\(\)|\.tolist\(\)|\bnonzero\(|\.cpu\(\)|\bint\(\s*[a-z_]+\[")


@pytest.mark.parametrize("path", HOT, ids=lambda p: str(p.relative_to(PKG)))
def test_hot_path_has_no_host_sync(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if SYNCING.search(line) and "sync-ok" not in line]
    assert not hits, f"host-syncing calls in {path.name}:\n" + "\n".join(hits)


@pytest.mark.gpu
def test_modality_linear_forward_backward_without_sync():
    dev = torch.device("cuda")
    layer = smk.nn.MoTLinear(256, 128, 3, bias=True, device=dev, dtype=torch.bfloat16)
    ids = torch.randint(0, 3, (4, 100), device=dev)
    x = torch.randn(4, 100, 256, device=dev, dtype=torch.bfloat16, requires_grad=True)
    layer(x, ids).sum().backward()  # warm-up: compile and autotune (autotuning syncs)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = smk.group_plan(ids, 3)
        layer(x, ids, plan=plan).float().square().mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
