"""Token-choice mixture of experts: every token picks its ``top_k`` experts (dropless).

``logits = x W_rᵀ`` -> ``token_choice_plan`` (one fused op: each token's ``k`` experts, renormalised softmax gates
and the expert-sorted plan of the ``N * k`` (token, expert) pairs - a token picked by ``k`` experts appears ``k``
times; the results of :func:`~sparsemm_kernels.token_choice_route` + ``group_plan``) -> the tokens copied into the
expert-sorted rows (``pick_rows``) -> one grouped SwiGLU over all experts -> each row scaled by its gate and added
back to its token (``sum_rows``: a fixed order, no atomics). Dropless: every pair is computed, whatever the load.
No host sync: ``N``, ``E`` and ``k`` are Python ints of the call.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.nn.moe import (
    _add_experts,
    _experts_swiglu,
    _flat_tokens,
    _init_experts,
    _no_tokens,
    router_logits,
)
from sparsemm_kernels.ops.grouped_ffn import grouped_swiglu_ffn
from sparsemm_kernels.ops.permute import sort_rows, unsort_rows
from sparsemm_kernels.ops.slots import pick_rows_op, sum_rows_op
from sparsemm_kernels.ops.token_routing import check_top_k, token_choice_plan
from sparsemm_kernels.plan import build_plan
from sparsemm_kernels.utils.checks import accumulation_dtype, check_positive_int


class TokenChoiceMoE(nn.Module):
    """Dropless token-choice SwiGLU MoE: ``out[t] = sum_j gates[t, j] * FFN_{expert_idx[t, j]}(x_t)``.

    Args:
        dim, hidden_dim: model and expert widths (many small experts - E = 64-128, top-8, a small ``hidden_dim`` -
            is the fine-grained case, the same layer).
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= E``.
        lb_coef: the load-balancing loss coefficient.
        backend: a preference for the routing, plan and grouped GEMM kernels.
        expert_parallel_group: None, or a process group over which the experts are sharded: rank ``r`` holds experts
            ``r * E/W ... (r+1) * E/W - 1`` (``w1, w3, w2`` hold only those), the routed rows are exchanged with
            ``all_to_all`` (one host read of the per-rank row counts per forward, for the split sizes). The router is
            replicated: average its gradient over the data-parallel ranks as usual (and keep the expert shards out of
            DDP's averaging).

    Parameters: ``w1, w3 [E, hidden, dim]``, ``w2 [E, dim, hidden]``, ``router`` (``nn.Linear(dim, E, bias=False)``).

    Attributes: ``aux_loss``, set by every training forward: ``lb_coef * E * sum_i u_i p_i`` with ``u_i`` the mean
    over tokens of expert ``i``'s renormalised gate (0 where ``i`` is not among a token's ``k``) and ``p_i`` the mean
    of ``softmax(logits)_i``; both differentiable. None outside training.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int = 2,
        lb_coef: float = 0.01,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        expert_parallel_group=None,
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim"), (num_experts, "num_experts")):
            check_positive_int(v, name)
        self.top_k = check_top_k(top_k, num_experts)
        self.expert_parallel_group, self.first_expert, local = expert_parallel_group, 0, num_experts
        if expert_parallel_group is not None:
            world = torch.distributed.get_world_size(expert_parallel_group)
            if num_experts % world:
                raise ValueError(f"`num_experts` {num_experts} must be divisible by the size {world} of "
                                 "`expert_parallel_group` (every rank holds the same number of experts)")
            local = num_experts // world
            self.first_expert = torch.distributed.get_rank(expert_parallel_group) * local
        self.num_local_experts = local
        if isinstance(lb_coef, bool) or not isinstance(lb_coef, (int, float)) or not lb_coef >= 0:
            raise ValueError(f"`lb_coef` must be a number >= 0, got {lb_coef!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.lb_coef, self.backend = float(lb_coef), check_backend_name(backend)
        _add_experts(self, self.num_local_experts, hidden_dim, dim, factory)
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Each expert's W1, W2, W3 like ``nn.Linear``; the router as ``nn.Linear``."""
        _init_experts(self)
        self.router.reset_parameters()

    def forward(self, x: torch.Tensor, modality_ids=None, plan=None, *, sorted_rows: bool = False) -> torch.Tensor:
        """x: ``[..., dim]`` -> ``[..., dim]``. ``modality_ids`` and ``plan`` are accepted and ignored (so the layer
        stands where a :class:`~sparsemm_kernels.nn.MoTFeedForward` stands); ``sorted_rows`` likewise (the rows are
        routed by the router, whatever their order)."""
        x2 = _flat_tokens(x, self.dim)
        N, k = x2.shape[0], self.top_k
        self.aux_loss = None
        if N == 0:
            return _no_tokens(self, x)
        logits = router_logits(self.router, x2)
        # The (token, expert) pairs sorted by expert: pair p = t * k + j; sorted row r holds pair sorted_to_orig[r].
        expert_idx, gates, pairs, slots, inverse = token_choice_plan(logits, k, backend=prefer(self.backend))
        if self.expert_parallel_group is not None:
            out = self._expert_parallel(x2, expert_idx, gates, pairs, slots, inverse)
            if self.training:
                self.aux_loss = self._load_balancing_loss(logits, expert_idx, gates)
            return out.view(x.shape)
        slot_gates = gates.reshape(-1).index_select(0, pairs.sorted_to_orig)
        out = _experts_swiglu(self, x2, slots, inverse, slot_gates, pairs.offsets)
        if self.training:
            self.aux_loss = self._load_balancing_loss(logits, expert_idx, gates)
        return out.view(x.shape)

    def _expert_parallel(self, x2d, expert_idx, gates, pairs, slots, inverse) -> torch.Tensor:
        """The experts sharded over ``expert_parallel_group``: the (token, expert) rows sorted by expert go to the
        rank holding their expert (``all_to_all``), run there through one grouped SwiGLU over its local experts, and
        come back the same way (autograd-aware collectives: the backward runs the exchange in reverse).

        The split sizes of an ``all_to_all`` are host integers: the per-rank row counts (``W`` ints, exchanged on
        the device) are read on the host once per forward - the one host sync of this path."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

        dist, group = torch.distributed, self.expert_parallel_group
        El = self.num_local_experts
        backend = prefer(self.backend)
        xe = pick_rows_op(x2d, slots, inverse)  # rows in global expert order: one contiguous run per rank
        send_counts = pairs.counts.view(-1, El).sum(1)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        send = send_counts.tolist()  # sync-ok: all_to_all split sizes are host ints (see the docstring)
        recv = recv_counts.tolist()  # sync-ok: likewise
        local_ids = expert_idx.reshape(-1).index_select(0, pairs.sorted_to_orig) % El
        recv_ids = torch.empty(sum(recv), dtype=local_ids.dtype, device=local_ids.device)
        dist.all_to_all_single(recv_ids, local_ids, recv, send, group=group)
        xr = wait_tensor(all_to_all_single_autograd(xe, recv, send, group))
        mine = build_plan(recv_ids, El, backend=backend, validate=False, name="expert_idx")
        xs = sort_rows(xr, mine)
        yr = unsort_rows(grouped_swiglu_ffn(xs, self.w1, self.w3, self.w2, mine, backend=backend), mine)
        ye = wait_tensor(all_to_all_single_autograd(yr, send, recv, group))  # back, in the order sent
        slot_gates = gates.reshape(-1).index_select(0, pairs.sorted_to_orig)
        return sum_rows_op(ye * slot_gates.reshape(-1, 1).to(ye.dtype), inverse, slots)

    def forward_sorted(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        """The sorted-rows entry point of the MoT layers (a block's FFN slot): ``x (T, dim)`` in any order ->
        ``(T, dim)`` in the same order. A module call, so hooks run."""
        return self(x, None, plan, sorted_rows=True)

    def _load_balancing_loss(self, logits, expert_idx, gates) -> torch.Tensor:
        E = self.num_experts
        acc = accumulation_dtype(logits.dtype)
        u = torch.zeros(logits.shape[0], E, dtype=acc, device=logits.device)
        u = u.scatter(1, expert_idx, gates.to(acc)).mean(0)  # each token's k experts are distinct: no collisions
        p = torch.softmax(logits.to(acc), dim=-1).mean(0)
        return self.lb_coef * E * (u * p).sum()

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"lb_coef={self.lb_coef}")
