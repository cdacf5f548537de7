"""Every bad input raises ValueError or TypeError naming the argument, before any kernel runs."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.utils.testing import offsets_from_counts

X = torch.randn(6, 4)
W = torch.randn(2, 3, 4)
OFF = offsets_from_counts([2, 4])


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(x=X.long()), TypeError, "x"),
        (dict(x=X[0]), ValueError, "x"),
        (dict(x=torch.randn(6, 5)), ValueError, "x"),                        # K mismatch
        (dict(weight=W[0]), ValueError, "weight"),                           # not 3-D
        (dict(weight=W.double()), TypeError, "weight"),                      # dtype mismatch
        (dict(weight=[[1.0]]), TypeError, "weight"),
        (dict(offsets=OFF.float()), TypeError, "offsets"),                   # float offsets
        (dict(offsets=OFF[:-1]), ValueError, "offsets"),                     # wrong length
        (dict(offsets=torch.tensor([0, 4, 2])), ValueError, "offsets"),      # decreasing
        (dict(offsets=torch.tensor([0, 2, 5])), ValueError, "offsets"),      # does not end at T
        (dict(offsets=torch.tensor([1, 2, 6])), ValueError, "offsets"),      # does not start at 0
        (dict(bias=torch.randn(2, 4)), ValueError, "bias"),
        (dict(bias=torch.randn(2, 3).double()), TypeError, "bias"),
        (dict(backend="nope"), ValueError, "backend"),
    ],
)
def test_grouped_mm_bad_input(kwargs, exc, name):
    args = dict(x=X, weight=W, offsets=OFF, bias=None)
    backend = kwargs.pop("backend", None)
    args.update(kwargs)
    with pytest.raises(exc, match=f"`{name}`"):
        smk.grouped_mm(args["x"], args["weight"], args["offsets"], args["bias"], backend=backend)


def test_grouped_linear_bad_plan():
    plan = smk.group_plan(torch.tensor([0, 1, 1]), 2)
    with pytest.raises(TypeError, match="`plan`"):
        smk.grouped_linear(X, W, OFF)
    with pytest.raises(ValueError, match="`plan`"):
        smk.grouped_linear(X, W, plan)  # 3 rows planned, 6 given
    with pytest.raises(ValueError, match="`plan`"):
        smk.grouped_linear(X[:3], torch.randn(3, 3, 4), plan)  # 2 groups planned, 3 weights


@pytest.mark.parametrize(
    "ids,exc,name",
    [
        (torch.tensor([[0, 1, 2], [0, 0, 1]]), ValueError, "modality_ids"),  # shape != x.shape[:-1]
        (torch.zeros(2, 3), TypeError, "modality_ids"),                      # float ids
        (torch.tensor([[0, 1, 2]]), ValueError, "modality_ids"),             # id 2 out of range for M=2
        (torch.tensor([[0, -1, 1]]), ValueError, "modality_ids"),            # negative id
    ],
)
def test_modality_linear_bad_ids(ids, exc, name):
    x = torch.randn(1, 3, 4)
    with pytest.raises(exc, match=f"`{name}`"):
        smk.modality_linear(x, ids, W)


def test_mot_linear_bad_input():
    layer = smk.nn.MoTLinear(4, 3, 2)
    with pytest.raises(ValueError, match="`x`"):
        layer(torch.randn(5, 7), torch.zeros(5, dtype=torch.long))  # in_features mismatch
    with pytest.raises(ValueError, match="`num_modalities`"):
        smk.nn.MoTLinear(4, 3, 0)
    with pytest.raises(TypeError, match="`linear`"):
        smk.nn.MoTLinear.from_linear(torch.nn.Conv1d(1, 1, 1), 2)
