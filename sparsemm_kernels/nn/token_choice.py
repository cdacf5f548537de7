"""Token-choice mixture of experts: every token picks its ``top_k`` experts (dropless).

``logits = x W_rᵀ`` -> :func:`~sparsemm_kernels.token_choice_route` (each token's ``k`` experts, renormalised
softmax gates) -> ``group_plan`` of the ``N * k`` (token, expert) pairs (a token picked by ``k`` experts appears
``k`` times) -> the tokens copied into the expert-sorted rows (``pick_rows``) -> one grouped SwiGLU over all experts
-> each row scaled by its gate and added back to its token (``sum_rows``: a fixed order, no atomics). Dropless:
every pair is computed, whatever the load. No host sync: ``N``, ``E`` and ``k`` are Python ints of the call.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.nn.moe import _add_experts, _experts_swiglu, _flat_tokens, _init_experts, _no_tokens
from sparsemm_kernels.ops.token_routing import check_top_k, token_choice_route
from sparsemm_kernels.plan import build_plan
from sparsemm_kernels.utils.checks import check_positive_int


class TokenChoiceMoE(nn.Module):
    """Dropless token-choice SwiGLU MoE: ``out[t] = sum_j gates[t, j] * FFN_{expert_idx[t, j]}(x_t)``.

    Args:
        dim, hidden_dim: model and expert widths (many small experts - E = 64-128, top-8, a small ``hidden_dim`` -
            is the fine-grained case, the same layer).
        num_experts: ``E``.
        top_k: experts per token, ``1 <= top_k <= E``.
        lb_coef: the load-balancing loss coefficient.
        backend: a preference for the routing, plan and grouped GEMM kernels.

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
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim"), (num_experts, "num_experts")):
            check_positive_int(v, name)
        self.top_k = check_top_k(top_k, num_experts)
        if isinstance(lb_coef, bool) or not isinstance(lb_coef, (int, float)) or not lb_coef >= 0:
            raise ValueError(f"`lb_coef` must be a number >= 0, got {lb_coef!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.lb_coef, self.backend = float(lb_coef), check_backend_name(backend)
        _add_experts(self, num_experts, hidden_dim, dim, factory)
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
        N, E, k = x2.shape[0], self.num_experts, self.top_k
        self.aux_loss = None
        if N == 0:
            return _no_tokens(self, x)
        logits = self.router(x2)
        expert_idx, gates = token_choice_route(logits, k, backend=prefer(self.backend))
        # The (token, expert) pairs sorted by expert: pair p = t * k + j; sorted row r holds pair sorted_to_orig[r].
        pairs = build_plan(expert_idx.reshape(-1), E, backend=prefer(self.backend), validate=False,
                           name="expert_idx")
        slots = torch.div(pairs.sorted_to_orig, k, rounding_mode="floor")
        inverse = pairs.orig_to_sorted.view(N, k)  # the k rows of every token
        slot_gates = gates.reshape(-1).index_select(0, pairs.sorted_to_orig)
        out = _experts_swiglu(self, x2, slots, inverse, slot_gates, pairs.offsets)
        if self.training:
            self.aux_loss = self._load_balancing_loss(logits, expert_idx, gates)
        return out.view(x.shape)

    def forward_sorted(self, x: torch.Tensor, plan=None) -> torch.Tensor:
        """The sorted-rows entry point of the MoT layers (a block's FFN slot): ``x (T, dim)`` in any order ->
        ``(T, dim)`` in the same order. A module call, so hooks run."""
        return self(x, None, plan, sorted_rows=True)

    def _load_balancing_loss(self, logits, expert_idx, gates) -> torch.Tensor:
        E = self.num_experts
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        u = torch.zeros(logits.shape[0], E, dtype=acc, device=logits.device)
        u = u.scatter(1, expert_idx, gates.to(acc)).mean(0)  # each token's k experts are distinct: no collisions
        p = torch.softmax(logits.to(acc), dim=-1).mean(0)
        return self.lb_coef * E * (u * p).sum()

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"lb_coef={self.lb_coef}")
