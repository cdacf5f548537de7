"""group_plan: a stable counting sort on every backend, checked against its invariants and an independent truth
(Python's stable ``sorted`` over the ids; ``sparsemm_kernels.reference`` is the ``torch`` backend itself)."""

import pytest
import torch

import sparsemm_kernels as smk
from sparsemm_kernels.backend import unsupported_reasons

BACKENDS = ["cuda", "triton", "cpu", "torch"]
CASES = [
    (0, 3),       # no rows
    (1, 1),       # one row, one group
    (17, 1),      # one group takes all
    (50, 64),     # many groups, most empty
    (1000, 3),    # the MoT case: a few modalities
    (2049, 7),    # a chunk boundary and one past
    (4100, 2),    # interpreter chunks of 1024 ids for G <= 64: four whole chunks and a partial one
    (300, 130),   # G > 128: smaller chunks (the one-hot tile is BLOCK x next_pow2(G)), several of them
]


def _truth(ids, g):
    """(sorted_to_orig, counts, offsets) by Python's stable sort and plain counting."""
    values = ids.tolist()
    order = sorted(range(len(values)), key=lambda i: values[i])
    counts = [values.count(k) for k in range(g)]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    as_tensor = lambda v: torch.tensor(v, dtype=torch.int64).reshape(-1)  # noqa: E731
    return as_tensor(order), as_tensor(counts), as_tensor(offsets)


def _run(backend, device, ids, g):
    reasons = unsupported_reasons("group_plan", backend, torch.device(device), ids.dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    return smk.group_plan(ids.to(device), g, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("n,g", CASES)
def test_plan_invariants_and_reference(n, g, id_dtype, backend, device):
    ids = torch.randint(0, g, (n,), dtype=id_dtype)
    if n > 10:
        ids[ids == g - 1] = 0  # force an empty last group
    plan = _run(backend, device, ids, g)
    s, counts, offsets = (t.cpu() for t in (plan.sorted_to_orig, plan.counts, plan.offsets))
    assert plan.num_rows == n and plan.num_groups == g
    assert s.dtype == counts.dtype == offsets.dtype == torch.int64
    assert torch.equal(torch.sort(s).values, torch.arange(n)), "sorted_to_orig must be a permutation"
    assert torch.equal(counts, torch.bincount(ids.long(), minlength=g))
    assert offsets[0] == 0 and offsets[-1] == n and torch.equal(offsets[1:] - offsets[:-1], counts)
    for grp in range(g):
        rows = s[offsets[grp] : offsets[grp + 1]]
        assert (ids[rows] == grp).all()
        assert (rows[1:] > rows[:-1]).all(), "stable: original order kept inside a group"
    want = _truth(ids, g)
    assert torch.equal(s, want[0]) and torch.equal(counts, want[1]) and torch.equal(offsets, want[2])
    inv = plan.orig_to_sorted.cpu()
    assert torch.equal(s[inv], torch.arange(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_plan_of_2d_ids_flattens(backend, device):
    ids = torch.tensor([[2, 0, 1], [0, 2, 2]])
    plan = _run(backend, device, ids, 3)
    assert plan.sorted_to_orig.cpu().tolist() == [1, 3, 2, 0, 4, 5]
    assert plan.offsets.cpu().tolist() == [0, 2, 3, 6]


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_out_of_range_ids_raise(backend, bad):
    ids = torch.tensor([0, 1, bad, 2])
    reasons = unsupported_reasons("group_plan", backend, torch.device("cpu"), ids.dtype)
    if reasons:
        pytest.skip("; ".join(reasons))
    with pytest.raises(ValueError, match="group_ids"):
        smk.group_plan(ids, 3, backend=backend)


def test_bad_arguments_raise_named_errors():
    with pytest.raises(TypeError, match="group_ids"):
        smk.group_plan(torch.tensor([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="group_ids"):
        smk.group_plan([0, 1], 2)
    with pytest.raises(ValueError, match="num_groups"):
        smk.group_plan(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="num_groups"):
        smk.group_plan(torch.tensor([0]), 2.0)


def test_triton_plan_past_its_histogram_bound(monkeypatch):
    # Its per-chunk histogram grows as ids x groups: past the bound a preference for triton gets the torch sort
    # (same plan), and a demand for it a ValueError naming the argument.
    from sparsemm_kernels.kernels.triton import group_plan as triton_plan

    reasons = unsupported_reasons("group_plan", "triton", torch.device("cpu"), torch.int64)
    if reasons:
        pytest.skip("; ".join(reasons))
    ids = torch.randint(0, 3, (100,), generator=torch.Generator().manual_seed(0))
    assert triton_plan.histogram_fits(100, 3)
    monkeypatch.setattr(triton_plan, "MAX_HISTOGRAM_ENTRIES", 2)
    assert not triton_plan.histogram_fits(100, 3)
    plan = smk.group_plan(ids, 3, backend="prefer:triton")
    want = _truth(ids, 3)
    assert torch.equal(plan.sorted_to_orig, want[0]) and torch.equal(plan.offsets, want[2])
    with pytest.raises(ValueError, match="`group_ids`.*histogram bound"):
        smk.group_plan(ids, 3, backend="triton")
