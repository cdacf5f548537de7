"""Expert-choice mixture of experts: every expert picks the tokens it scores highest.

``s = sigmoid(x W_rᵀ)`` (or a softmax over experts) -> :func:`~sparsemm_kernels.expert_choice_route` (each
expert's ``C`` top tokens: the expert-major plan) -> the tokens copied into the ``E * C`` expert slots
(``pick_rows``) -> one grouped SwiGLU over all experts (group ``e`` = slots ``e*C : (e+1)*C``) -> each slot
scaled by its gate and added back to its token (``sum_rows``, a fixed order: no atomics). No host sync: ``N``,
``E`` and ``C`` are Python ints of the call.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.nn.mot_linear import init_per_modality_
from sparsemm_kernels.ops.grouped_linear import grouped_mm
from sparsemm_kernels.ops.routing import expert_choice_route
from sparsemm_kernels.ops.slots import pick_rows_op, slot_inverse, sum_rows_op
from sparsemm_kernels.ops.swiglu import silu_mul
from sparsemm_kernels.utils.checks import check_float_tensor, check_positive_int

_GATES = ("sigmoid", "softmax")
_NOISE = (None, "gumbel")


def expert_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    """Tokens per expert: ``C = min(max(ceil(capacity_factor * N / E), 1), N)`` (0 when ``N = 0``)."""
    if num_tokens == 0:
        return 0
    return min(max(math.ceil(capacity_factor * num_tokens / num_experts), 1), num_tokens)


class ExpertChoiceMoE(nn.Module):
    """A SwiGLU mixture of experts with expert-choice routing (Zhou et al. 2022; MoMa's routing).

    All ``N`` tokens of a call compete: expert ``e`` takes the ``C`` tokens with the highest scores
    ``s[:, e]``; ``out[t] = sum_{e picked t} s[t, e] * FFN_e(x_t)``; a token no expert picked gets 0.

    Args:
        dim, hidden_dim: model and SwiGLU widths; num_experts: ``E``.
        capacity_factor: ``c > 0``; ``C = min(max(ceil(c * N / E), 1), N)`` (:func:`expert_capacity`).
        gate: ``"sigmoid"`` (MoMa: scores independent per expert) or ``"softmax"`` (over experts).
        router_noise: None, or ``"gumbel"``: ``g' - g''`` (iid Gumbel(0, 1)) added to the router logits in
            training mode only.
        device, dtype: parameter factory kwargs; backend: the backend this module's ops prefer.

    Parameters:
        ``router`` (``nn.Linear(dim, E, bias=False)``), ``w1, w3 [E, hidden, dim]``, ``w2 [E, dim, hidden]``
        (each expert initialised like ``nn.Linear``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float = 1.0,
        gate: str = "sigmoid",
        router_noise: str | None = None,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim"), (num_experts, "num_experts")):
            check_positive_int(v, name)
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
            raise TypeError(f"`capacity_factor` must be a number, got {type(capacity_factor).__name__}")
        if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
            raise ValueError(f"`capacity_factor` must be a finite number > 0, got {capacity_factor}")
        if gate not in _GATES:
            raise ValueError(f"`gate` must be one of {_GATES}, got {gate!r}")
        if router_noise not in _NOISE:
            raise ValueError(f"`router_noise` must be None or 'gumbel', got {router_noise!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.capacity_factor, self.gate, self.router_noise = float(capacity_factor), gate, router_noise
        self.backend = check_backend_name(backend)
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The router and each expert's W1, W3, W2 initialised like ``nn.Linear``."""
        self.router.reset_parameters()
        for w in (self.w1, self.w3, self.w2):
            init_per_modality_(w)

    def scores(self, x2d: torch.Tensor) -> torch.Tensor:
        """Router scores ``[N, E]`` of tokens ``x2d [N, dim]`` (with Gumbel noise in training, if configured)."""
        logits = self.router(x2d)
        if self.router_noise == "gumbel" and self.training:
            u = torch.rand((2, *logits.shape), device=logits.device, dtype=torch.float32)
            gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))  # Gumbel(0, 1)
            logits = logits + (gumbel[0] - gumbel[1]).to(logits.dtype)
        return torch.sigmoid(logits) if self.gate == "sigmoid" else torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[..., dim]``; token_mask: optional bool ``x.shape[:-1]`` (False: never routed, output 0).
        Returns ``[..., dim]``."""
        check_float_tensor(x, "x")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"`x` must be (..., {self.dim}), got shape {tuple(x.shape)}")
        x2 = x.reshape(-1, self.dim)
        N, E = x2.shape[0], self.num_experts
        if token_mask is not None:
            if not isinstance(token_mask, torch.Tensor) or tuple(token_mask.shape) != tuple(x.shape[:-1]):
                shape = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask)
                raise ValueError(f"`token_mask` must have shape {tuple(x.shape[:-1])} (x without its last dim), "
                                 f"got {shape}")
            token_mask = token_mask.reshape(-1)
        C = expert_capacity(self.capacity_factor, N, E)
        if C == 0:  # no tokens: nothing to route (keep the graph connected to every parameter)
            return x2.new_zeros(x.shape) + 0 * sum(p.sum() for p in self.parameters())
        s = self.scores(x2)
        token_idx, gates = expert_choice_route(s, C, token_mask)
        slots = token_idx.reshape(-1)
        inverse = slot_inverse(token_idx, N)
        backend = prefer(self.backend)
        xe = pick_rows_op(x2, slots, inverse)  # [E*C, dim]: empty slots are zero rows
        offsets = torch.arange(0, (E + 1) * C, C, device=x2.device)
        h = silu_mul(grouped_mm(xe, self.w1, offsets, backend=backend),
                     grouped_mm(xe, self.w3, offsets, backend=backend), backend=backend)
        ye = grouped_mm(h, self.w2, offsets, backend=backend)  # the autocast dtype under autocast
        ye = ye * gates.reshape(-1, 1).to(ye.dtype)
        return sum_rows_op(ye, inverse, slots).view(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor}, gate={self.gate!r}, router_noise={self.router_noise!r}")
