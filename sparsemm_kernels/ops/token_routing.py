"""Token-choice routing: every token picks its ``top_k`` experts.

``token_choice_route(logits [N, E], top_k)`` -> ``(expert_idx [N, k], gates [N, k])``: per token the ``k`` largest
logits in descending order, ties to the lower expert index, and the softmax over those ``k`` logits (the
renormalised top-k gates). The choice is ``sparsemm::token_topk`` (a custom op with no gradient: an index choice has
none) on the ``triton`` (one program per block of tokens), ``cpu`` (C++ partial sort) or ``torch`` (a stable sort)
backends; the gates are a differentiable gather of ``logits`` and a softmax. ``group_plan(expert_idx.flatten(), E)``
then gives the expert-sorted plan of the ``N * k`` (token, expert) pairs for the grouped GEMM. No host sync.
"""

from __future__ import annotations

import torch

from sparsemm_kernels.backend import check_backend_name, select_backend
from sparsemm_kernels.ops.dispatch import Op
from sparsemm_kernels.ops.routing import check_finite_scores
from sparsemm_kernels.utils.checks import ASYNC, EAGER, check_dim, check_float_tensor, validation_mode


def _topk_torch(logits: torch.Tensor, k: int) -> torch.Tensor:
    # A stable descending sort keeps equal logits in expert order: ties go to the lower index.
    return torch.sort(logits, dim=1, descending=True, stable=True).indices[:, :k].contiguous()


def _token_topk(logits: torch.Tensor, k: int, backend: str | None) -> torch.Tensor:
    """``[N, k]`` int64: per row of ``logits [N, E]`` the indices of the ``k`` largest, descending, ties to the
    lower index."""
    name = select_backend("token_choice_route", logits.device, logits.dtype, backend)
    if name == "triton":
        from sparsemm_kernels.kernels.triton.token_topk import token_topk_triton

        return token_topk_triton(logits, k)
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
    check_float_tensor(logits, "logits")
    check_dim(logits, 2, "logits", "[N, E] (tokens x experts)")
    N, E = logits.shape
    if E == 0:
        raise ValueError("`logits` must have at least one expert column, got shape (N, 0)")
    k = check_top_k(top_k, E)
    mode = validation_mode(validate, logits.device)
    if mode == EAGER and torch.compiler.is_compiling():  # a traced graph cannot raise on a value: assert instead
        mode = ASYNC
    check_finite_scores(logits.detach(), "logits", mode)
    idx = token_topk_op(logits.detach(), k, check_backend_name(backend))
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    gates = torch.softmax(logits.gather(1, idx).to(acc), dim=-1).to(logits.dtype)
    return idx, gates
