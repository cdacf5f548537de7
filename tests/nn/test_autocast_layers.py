"""The routed layers under torch.autocast (bfloat16 on the CPU): forward and backward run, the output keeps a float
dtype autocast allows, every parameter gets a finite gradient, and the result stays close to the float32 run."""

import pytest
import torch

from sparsemm_kernels.nn import AvgKFeedForward, MixtureOfDepths, MoTBlock, TokenChoiceMoE

D = 32


def _layers():
    torch.manual_seed(0)
    return {
        "mod": (MixtureOfDepths(MoTBlock(D, 2, 48, 2), D, capacity=0.5), True),
        "mod_batch": (MixtureOfDepths(MoTBlock(D, 2, 48, 2), D, capacity=0.5, batch_level=True), True),
        "token_choice": (TokenChoiceMoE(D, 48, 4, top_k=2), False),
        "avgk": (AvgKFeedForward(D, 64, 8, 3, glu=True, bias=True, strategy="grouped"), False),
        "avgk_gathered": (AvgKFeedForward(D, 64, 8, 3, glu=True, bias=True, strategy="gathered"), False),
    }


@pytest.mark.parametrize("name", ["mod", "mod_batch", "token_choice", "avgk", "avgk_gathered"])
def test_layer_under_autocast(name):
    layer, takes_ids = _layers()[name]
    x = torch.randn(2, 12, D)
    args = (torch.randint(0, 2, (2, 12)),) if takes_ids else ()
    want = layer(x, *args).detach()
    xs = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(xs, *args)
    assert y.dtype in (torch.float32, torch.bfloat16) and y.shape == x.shape
    y.float().square().mean().backward()
    assert xs.grad is not None and bool(torch.isfinite(xs.grad).all())
    for n, p in layer.named_parameters():
        if p.grad is not None:
            assert bool(torch.isfinite(p.grad).all()), n
    # bf16 GEMMs: close to float32 (a routing tie flipped by rounding would move a few rows, not the whole output)
    err = (y.float() - want).norm() / want.norm()
    assert err < 0.1, err
