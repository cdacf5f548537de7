"""Token-choice routing: every token picks its ``top_k`` experts.

``token_choice_route(logits [N, E], top_k)`` -> ``(expert_idx [N, k], gates [N, k])``: per token the ``k`` largest
logits in descending order, ties to the lower expert index, and the softmax over those ``k`` logits (the
renormalised top-k gates). The choice is ``sparsemm::token_topk`` (a custom op with no gradient: an index choice has
none) on the ``triton`` (one program per block of tokens), ``cpu`` (C++ partial sort) or ``torch`` (a stable sort)
backends; the gates are a differentiable gather of ``logits`` and a softmax. ``group_plan(expert_idx.flatten(), E)``
then gives the expert-sorted plan of the ``N * k`` (token, expert) pairs for the grouped GEMM. No host sync.

``token_choice_plan(logits, top_k)`` (what :class:`~sparsemm_kernels.nn.TokenChoiceMoE` runs) is the fused form of
``token_choice_route`` + :func:`~sparsemm_kernels.ops.slots.pair_rows`: one op, ``sparsemm::token_choice_plan``,
gives the experts, the gates and the plan of the pairs together (Triton: one kernel per token block for the top-k,
the gates and a per-block expert histogram, then a placement kernel; C++: the same over blocks of tokens; torch:
the sort, a softmax and the reference plan), with the gates' gradient registered as a formula.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.ops.routing import check_finite_scores
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import (
    ASYNC,
    EAGER,
    accumulation_dtype,
    check_dim,
    check_float_tensor,
    validation_mode,
)


def _topk_torch(logits: torch.Tensor, k: int) -> torch.Tensor:
    # A stable descending sort keeps equal logits in expert order: ties go to the lower index. NaN (possible only
    # unchecked) is read as -inf, as the kernels read it (the sort alone would rank it first).
    logits = torch.where(logits.isnan(), float("-inf"), logits)
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous()


def _token_topk(logits: torch.Tensor, k: int, backend: str | None) -> torch.Tensor:
    """``[N, k]`` int64: per row of ``logits [N, E]`` the indices of the ``k`` largest, descending, ties to the
    lower index."""
    name = select_backend("token_choice_route", logits.device, logits.dtype, backend)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.token_topk import MAX_EXPERTS, token_topk_triton

        if logits.shape[1] <= MAX_EXPERTS or backend == "triton":  # demanded: its own error past the limit
            return token_topk_triton(logits, k)
        name = "torch"  # wider rows: the sort
    if name == "cpu":
        from sparsemm_kernels.kernels.cpu import token_topk_cpu

        return token_topk_cpu(logits, k)
    return _topk_torch(logits, k)


def _token_topk_fake(logits, k, backend):
    return logits.new_empty(logits.shape[0], k, dtype=torch.int64)


token_topk_op = Op("sparsemm::token_topk", _token_topk, _token_topk_fake)


def check_top_k(top_k, num_experts: int) -> int:
    """``top_k`` as an int in ``[1, num_experts]`` (``TypeError`` / ``ValueError`` naming it)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"`top_k` must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"`top_k` must be in [1, {num_experts}] (the number of experts), got {top_k}")
    return top_k


def _check_logits(logits: torch.Tensor, top_k, validate: bool | None) -> int:
    """``logits [N, E]`` (float, ``E >= 1``, finite per ``validate``) checked; ``top_k`` as an int in ``[1, E]``."""
    check_float_tensor(logits, "logits")
    check_dim(logits, 2, "logits", "[N, E] (tokens x experts)")
    if logits.shape[1] == 0:
        raise ValueError("`logits` must have at least one expert column, got shape (N, 0)")
    k = check_top_k(top_k, logits.shape[1])
    mode = validation_mode(validate, logits.device)
    if mode == EAGER and torch.compiler.is_compiling():  # a traced graph cannot raise on a value: assert instead
        mode = ASYNC
    check_finite_scores(logits.detach(), "logits", mode)
    return k


def token_choice_route(
    logits: torch.Tensor,
    top_k: int,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-choice routing: the ``top_k`` experts of every token and their renormalised gates.

    Args:
        logits: ``[N, E]`` float router logits (token x expert); must be finite.
        top_k: experts per token, ``1 <= top_k <= E``.
        backend: ``"triton"``, ``"cpu"``, ``"torch"`` or ``"auto"``/None (see :mod:`sparsemm_kernels.backend`).
        validate: the finiteness check of ``logits``: eager on CPU, an asynchronous device assertion on CUDA;
            ``False`` off.

    Returns:
        ``expert_idx [N, k]`` int64, each row's experts by descending logit (ties to the lower index), and
        ``gates [N, k]`` in ``logits``' dtype: ``softmax`` over the chosen logits (in float32; float64 for
        float64), rows summing to 1; differentiable in ``logits``.
    """
    k = _check_logits(logits, top_k, validate)
    idx = token_topk_op(logits.detach(), k, check_backend_name(backend))
    gates = torch.softmax(logits.gather(1, idx).to(accumulation_dtype(logits.dtype)), dim=-1).to(logits.dtype)
    return idx, gates


# ---- the fused path: experts, gates and the plan of the (token, expert) pairs in one op ----


def _token_choice_plan_torch(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    from sparsemm_kernels.reference.plan import group_plan_ref

    idx = _topk_torch(logits, k)
    gates = torch.softmax(logits.gather(1, idx).to(accumulation_dtype(logits.dtype)), dim=-1)
    sorted_to_orig, counts, offsets = group_plan_ref(idx.reshape(-1), logits.shape[1])
    orig_to_sorted = torch.empty_like(sorted_to_orig)
    orig_to_sorted[sorted_to_orig] = torch.arange(sorted_to_orig.numel(), device=logits.device)
    slots = torch.div(sorted_to_orig, k, rounding_mode="floor")
    return idx, gates, sorted_to_orig, slots, counts, offsets, orig_to_sorted


def _token_choice_plan_any(logits: torch.Tensor, k: int, backend: str | None) -> tuple[torch.Tensor, ...]:
    """The launchers' order: ``(expert_idx, gates, sorted_to_orig, slots, counts, offsets, orig_to_sorted)``."""
    name = select_backend("token_choice_route", logits.device, logits.dtype, backend)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.token_topk import MAX_EXPERTS, token_choice_plan_triton

        if logits.shape[1] <= MAX_EXPERTS:
            return token_choice_plan_triton(logits, k)
        if backend == "triton":
            raise ValueError(f"the triton token-choice plan takes at most {MAX_EXPERTS} experts, got "
                             f"{logits.shape[1]}")
        name = "torch"  # wider rows: the sort, unless triton was demanded
    if name == "cpu":
        from sparsemm_kernels.kernels.cpu import token_choice_plan_cpu

        return token_choice_plan_cpu(logits, k)
    return _token_choice_plan_torch(logits, k)


def _token_choice_plan(
    logits: torch.Tensor, k: int, backend: str | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gates [N, k], expert_idx [N, k], sorted_to_orig [N*k], slots [N*k], counts [E], offsets [E+1],
    orig_to_sorted [N*k])`` of ``logits [N, E]``: int64 except ``gates`` (float64 for float64 logits, else
    float32). The plan is the stable sort of the pairs ``p = t * k + j`` by expert."""
    idx, gates, *plan = _token_choice_plan_any(logits, k, backend)
    # The float output first: autograd checks (opcheck) sum the outputs in order, and an int first would not.
    return (gates, idx, *plan)


def _token_choice_plan_fake(logits, k, backend):
    N, E = logits.shape
    s2o, slots, o2s = (logits.new_empty(N * k, dtype=torch.int64) for _ in range(3))
    gates = logits.new_empty(N, k, dtype=accumulation_dtype(logits.dtype))
    return (gates, logits.new_empty(N, k, dtype=torch.int64), s2o, slots, logits.new_empty(E, dtype=torch.int64),
            logits.new_empty(E + 1, dtype=torch.int64), o2s)


def _plan_setup(ctx, inputs, output):
    logits = inputs[0]
    ctx.save_for_backward(output[0], output[1])  # the gates (an output: double backward follows) and the experts
    ctx.num_experts, ctx.logits_dtype = logits.shape[1], logits.dtype


def _plan_backward(ctx, d_gates, *d_ints):
    """The softmax's backward at the chosen columns: ``dlogits[t, idx[t, j]] = g_j (dg_j - sum_i g_i dg_i)``,
    zero elsewhere (a row's ``k`` experts are distinct: the scatter has one writer per entry). Plain torch ops on
    the saved gates, so second derivatives are exact."""
    gates, idx = ctx.saved_tensors
    if d_gates is None:
        return None, None, None
    dg = d_gates.to(gates.dtype)
    d = gates * (dg - (gates * dg).sum(1, keepdim=True))
    dlogits = d.new_zeros(idx.shape[0], ctx.num_experts).scatter(1, idx, d)
    return dlogits.to(ctx.logits_dtype), None, None


token_choice_plan_op = Op("sparsemm::token_choice_plan", _token_choice_plan, _token_choice_plan_fake, _plan_setup,
                          _plan_backward)


def token_choice_plan(
    logits: torch.Tensor,
    top_k: int,
    *,
    backend: str | None = None,
    validate: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, GroupPlan, torch.Tensor, torch.Tensor]:
    """:func:`token_choice_route` and the plan of its ``N * k`` (token, expert) pairs, fused (no host sync).

    Args: as :func:`token_choice_route`.

    Returns:
        ``(expert_idx, gates, plan, slots, inverse)``: ``expert_idx [N, k]`` int64 equal to
        :func:`token_choice_route`'s; ``gates [N, k]`` in ``logits``' dtype, equal to its gates up to rounding
        (computed by the kernel in float32, float64 for float64), differentiable in ``logits``; ``plan`` the
        :class:`~sparsemm_kernels.plan.GroupPlan` of the pairs ``p = t * k + j`` over ``E`` groups, equal bit for
        bit to ``group_plan(expert_idx.reshape(-1), E)``; ``slots [N * k]`` the token of each sorted pair and
        ``inverse [N, k]`` the sorted position of each pair - the outputs of
        :func:`~sparsemm_kernels.ops.slots.pair_rows`.
    """
    k = _check_logits(logits, top_k, validate)
    N, E = logits.shape
    gates, idx, sorted_to_orig, slots, counts, offsets, orig_to_sorted = token_choice_plan_op(
        logits, k, check_backend_name(backend))
    flat = idx.reshape(-1)
    plan = GroupPlan(sorted_to_orig, offsets, counts, E, N * k, orig_to_sorted, trusted=True, group_ids=flat)
    return idx, gates.to(logits.dtype), plan, slots, orig_to_sorted.view(N, k)
