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
import torch.nn.functional as F
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.nn.mot_linear import init_per_modality_
from sparsemm_kernels.ops.grouped_ffn import grouped_swiglu_ffn
from sparsemm_kernels.ops.routing import _route, expert_choice_route, gather_gates
from sparsemm_kernels.ops.slots import pick_rows_op, slot_inverse, sum_rows_op
from sparsemm_kernels.utils.checks import accumulation_dtype, check_float_tensor, check_positive_int
from sparsemm_kernels.utils.distributed import all_gather_rows, group_size, rank_share

_GATES = ("sigmoid", "softmax")
_NOISE = (None, "gumbel")


def expert_capacity(capacity_factor: float, num_tokens: int, num_experts: int) -> int:
    """Tokens per expert: ``C = min(max(ceil(capacity_factor * N / E), 1), N)`` (0 when ``N = 0``)."""
    if num_tokens == 0:
        return 0
    return min(max(math.ceil(capacity_factor * num_tokens / num_experts), 1), num_tokens)


def _flat_tokens(x: torch.Tensor, dim: int) -> torch.Tensor:
    check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"`x` must be (..., {dim}), got shape {tuple(x.shape)}")
    return x.reshape(-1, dim)


def _flat_mask(token_mask: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    if token_mask is None:
        return None
    if not isinstance(token_mask, torch.Tensor) or tuple(token_mask.shape) != tuple(x.shape[:-1]):
        shape = tuple(token_mask.shape) if isinstance(token_mask, torch.Tensor) else type(token_mask)
        raise ValueError(f"`token_mask` must have shape {tuple(x.shape[:-1])} (x without its last dim), got {shape}")
    return token_mask.reshape(-1)


def _no_tokens(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Nothing to route; the graph stays connected to every parameter (their gradients are exact zeros).
    return x.new_zeros(x.shape) + 0 * sum(p.sum() for p in module.parameters())


def _add_experts(module: nn.Module, num_experts: int, hidden_dim: int, dim: int, factory: dict) -> None:
    """The SwiGLU experts' parameters every expert layer holds: ``w1, w3 [E, hidden, dim]``, ``w2 [E, dim, hidden]``
    (uninitialised: :func:`_init_experts`)."""
    module.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
    module.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim, **factory))
    module.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim, **factory))


def _init_experts(module: nn.Module) -> None:
    """Each expert's W1, W3, W2 initialised like ``nn.Linear``."""
    for w in (module.w1, module.w3, module.w2):
        init_per_modality_(w)


def router_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``router(x)`` in at least float32, with autocast off: 16-bit router scores tie by the thousand (bf16 near a
    sigmoid's 0.5 resolves steps of 2^-9), and ties go to the lower token or expert, a systematic bias in who is
    chosen. Differentiable in ``x`` and the router's parameters; the gates are cast back where they scale outputs."""
    dtype = accumulation_dtype(x.dtype)
    bias = router.bias.to(dtype) if router.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dtype), router.weight.to(dtype), bias)


def _experts_swiglu(module: nn.Module, x2d, slots, inverse, gates, offsets) -> torch.Tensor:
    """The tokens copied into their expert slots (``slots``: the token of each buffer row, -1 empty), one grouped
    SwiGLU over all experts (expert ``e`` = rows ``offsets[e]:offsets[e+1]``), each row scaled by its gate and
    added back to its token through ``inverse`` (a fixed order, no atomics)."""
    backend = prefer(module.backend)
    xe = pick_rows_op(x2d, slots, inverse)  # empty slots are zero rows
    ye = grouped_swiglu_ffn(xe, module.w1, module.w3, module.w2, offsets, backend=backend)  # autocast dtype
    return sum_rows_op(ye * gates.reshape(-1, 1).to(ye.dtype), inverse, slots)


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
        selection_group: None (default: the tokens of this call compete, per rank under torch.distributed, as
            the papers trained) or a process group: the experts choose among the tokens of every rank of the group
            (``C`` from their total; the scores all-gathered, which needs the same ``N`` on every rank; each rank
            computes its own tokens' share). An attribute, settable after construction.

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
        selection_group=None,
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim"), (num_experts, "num_experts")):
            check_positive_int(v, name)
        capacity_factor = _check_capacity_factor(capacity_factor)
        if gate not in _GATES:
            raise ValueError(f"`gate` must be one of {_GATES}, got {gate!r}")
        if router_noise not in _NOISE:
            raise ValueError(f"`router_noise` must be None or 'gumbel', got {router_noise!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.capacity_factor, self.gate, self.router_noise = capacity_factor, gate, router_noise
        self.backend = check_backend_name(backend)
        self.selection_group = selection_group
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        _add_experts(self, num_experts, hidden_dim, dim, factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The router and each expert's W1, W3, W2 initialised like ``nn.Linear``."""
        self.router.reset_parameters()
        _init_experts(self)

    def scores(self, x2d: torch.Tensor) -> torch.Tensor:
        """Router scores ``[N, E]`` of tokens ``x2d [N, dim]`` (with Gumbel noise in training, if configured)."""
        logits = router_logits(self.router, x2d)
        if self.router_noise == "gumbel" and self.training:
            u = torch.rand((2, *logits.shape), device=logits.device, dtype=torch.float32)
            gumbel = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))  # Gumbel(0, 1)
            logits = logits + (gumbel[0] - gumbel[1]).to(logits.dtype)
        return torch.sigmoid(logits) if self.gate == "sigmoid" else torch.softmax(logits, dim=-1)

    def forward(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``[..., dim]``; token_mask: optional bool ``x.shape[:-1]`` (False: never routed, output 0).
        Returns ``[..., dim]``."""
        x2 = _flat_tokens(x, self.dim)
        N, E = x2.shape[0], self.num_experts
        token_mask = _flat_mask(token_mask, x)
        if group_size(self.selection_group) > 1:
            token_idx, gates, C = self._route_over_group(self.scores(x2), token_mask, self.selection_group)
        else:
            C = expert_capacity(self.capacity_factor, N, E)
            token_idx, gates = expert_choice_route(self.scores(x2), C, token_mask) if C else (None, None)
        if C == 0:
            return _no_tokens(self, x)
        slots = token_idx.reshape(-1)
        offsets = torch.arange(0, (E + 1) * C, C, device=x2.device)
        return _experts_swiglu(self, x2, slots, slot_inverse(token_idx, N), gates, offsets).view(x.shape)

    def _route_over_group(self, s: torch.Tensor, token_mask, group):
        """Expert choice over the tokens of every rank of ``group`` (the scores all-gathered; each rank the same
        ``N``): ``(token_idx [E, C] of this rank's tokens, -1 for the slots other ranks' tokens won, gates, C)``.
        Only the choice crosses ranks; the gates are this rank's own scores, so gradients stay local."""
        W, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        N, E = s.shape
        mask = all_gather_rows(token_mask, group) if token_mask is not None else None
        C = expert_capacity(self.capacity_factor, W * N, E)
        if C == 0:
            return None, None, 0
        chosen, _ = expert_choice_route(all_gather_rows(s, group), C, mask)  # global token ids, ascending
        local = chosen - rank * N
        token_idx = torch.where((chosen >= 0) & (local >= 0) & (local < N), local, -1)
        return token_idx, gather_gates(s, token_idx), C

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"capacity_factor={self.capacity_factor}, gate={self.gate!r}, router_noise={self.router_noise!r}")


def _check_capacity_factor(capacity_factor) -> float:
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)):
        raise TypeError(f"`capacity_factor` must be a number, got {type(capacity_factor).__name__}")
    if not (capacity_factor > 0 and math.isfinite(capacity_factor)):
        raise ValueError(f"`capacity_factor` must be a finite number > 0, got {capacity_factor}")
    return float(capacity_factor)


def _check_experts_per_modality(experts) -> tuple[int, ...]:
    if isinstance(experts, (str, bytes)) or not hasattr(experts, "__len__") or len(experts) == 0:
        raise ValueError(f"`experts_per_modality` must be a non-empty sequence of expert counts, got {experts!r}")
    out = []
    for v in experts:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`experts_per_modality` must hold ints >= 1 (one count per modality), got {experts!r}")
        out.append(v)
    return tuple(out)


class AuxRouter(nn.Module):
    """MoMa's auxiliary router of one group: ``a(x) = sigmoid(A2 silu(A1 x))``, ``A1 [dim/2, dim]``,
    ``A2 [E_m, dim/2]`` (``a1``, ``a2``: ``nn.Linear`` without bias)."""

    def __init__(self, dim: int, num_experts: int, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.a1 = nn.Linear(dim, max(dim // 2, 1), bias=False, **factory)
        self.a2 = nn.Linear(max(dim // 2, 1), num_experts, bias=False, **factory)

    def reset_parameters(self) -> None:
        """Both projections initialised like ``nn.Linear``."""
        self.a1.reset_parameters()
        self.a2.reset_parameters()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``A2 silu(A1 x)``: the pre-sigmoid scores ``[..., E_m]`` (``a_j > 0.5`` iff the logit is > 0)."""
        return self.a2(F.silu(self.a1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``a(x) [..., E_m]`` in ``(0, 1)``."""
        return torch.sigmoid(self.logits(x))


class MoMaFeedForward(nn.Module):
    """MoMa's modality-aware experts: the modality picks a group of experts, expert choice inside the group.

    Group ``m`` (its ``b_m`` tokens, those with modality ``m``) has ``E_m`` SwiGLU experts and a router
    ``routers[m]``; each of its experts takes the ``C_m = min(max(ceil(c * b_m / E_m), 1), b_m)`` tokens of the
    group it scores highest (nothing when ``b_m = 0``); ``out[t] = sum_{e picked t} s[t, e] * FFN_e(x_t)``.
    ``b_m`` lives on the device: every size is a bound (at most ``ceil(c * N) + E_total`` expert rows) and the
    experts' rows are packed by offsets computed on the device, so **all groups' experts run in one grouped
    GEMM per projection**, no loop over groups or experts, no host sync (on the Triton backend).

    Args:
        dim, hidden_dim: model and SwiGLU widths.
        experts_per_modality: ``(E_0, E_1, ...)``, e.g. ``(4, 4)`` for MoMa 4t4i.
        capacity_factor: ``c > 0``.
        gate: ``"sigmoid"`` (MoMa) or ``"softmax"`` (over the group's experts).
        aux_router: add MoMa's auxiliary routers for causal decoding (:class:`AuxRouter` per group). In training
            every forward sets ``aux_loss``: the binary cross-entropy of ``a(x)`` on **detached** inputs against
            the true expert-choice membership (it trains the aux routers only). With ``causal_routing = True``
            token ``t`` goes to expert ``j`` of its group iff ``a_j(x_t) > 0.5``, weighted by ``s[t, j]``: a
            token's output depends on that token alone (one decoding token works).
        device, dtype, backend: as the other modules.
        selection_group: None (default: per call, per rank under torch.distributed) or a process group: every
            group of experts chooses among the tokens of its modality on every rank of the process group (``b_m``
            summed over the ranks; scores and eligibility all-gathered, which needs the same ``N`` on every rank);
            each rank computes its own tokens' share. An attribute, settable after construction.

    Parameters:
        ``w1, w3 [E_total, hidden, dim]``, ``w2 [E_total, dim, hidden]`` (modality 0's experts first, then
        modality 1's, ...), ``routers`` (``nn.ModuleList`` of ``nn.Linear(dim, E_m, bias=False)``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        experts_per_modality=(4, 4),
        capacity_factor: float = 1.0,
        gate: str = "sigmoid",
        aux_router: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
        selection_group=None,
    ) -> None:
        super().__init__()
        for v, name in ((dim, "dim"), (hidden_dim, "hidden_dim")):
            check_positive_int(v, name)
        experts = _check_experts_per_modality(experts_per_modality)
        self.selection_group = selection_group
        self.capacity_factor = _check_capacity_factor(capacity_factor)
        if gate not in _GATES:
            raise ValueError(f"`gate` must be one of {_GATES}, got {gate!r}")
        factory = {"device": device, "dtype": dtype}
        self.dim, self.hidden_dim, self.experts_per_modality, self.gate = dim, hidden_dim, experts, gate
        self.num_modalities, self.num_experts = len(experts), sum(experts)
        self.backend = check_backend_name(backend)
        self.routers = nn.ModuleList(nn.Linear(dim, e, bias=False, **factory) for e in experts)
        #: MoMa's auxiliary routers (``aux_router=True``): ``a(x) = sigmoid(A2 silu(A1 x))`` per group, trained by
        #: :attr:`aux_loss` on detached inputs; with :attr:`causal_routing` they route instead of expert choice.
        self.aux_routers = nn.ModuleList(AuxRouter(dim, e, **factory) for e in experts) if aux_router else None
        self.causal_routing = False
        self.aux_loss: torch.Tensor | None = None
        _add_experts(self, self.num_experts, hidden_dim, dim, factory)
        # each expert's group, as a buffer so that it follows .to(device)
        group_of = [g for g, count in enumerate(experts) for _ in range(count)]
        self.register_buffer("expert_group", torch.tensor(group_of, device=device), persistent=False)
        self.register_buffer("group_sizes", torch.tensor(experts, dtype=torch.float64, device=device),
                             persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Routers and each expert's W1, W3, W2 initialised like ``nn.Linear``."""
        for r in self.routers:
            r.reset_parameters()
        for a in self.aux_routers or ():
            a.reset_parameters()
        _init_experts(self)

    @classmethod
    def from_modality_ffn(cls, ffn, experts_per_modality, **kwargs) -> MoMaFeedForward:
        """Upcycling: every expert of group ``m`` starts as a copy of modality ``m``'s FFN of ``ffn`` (a
        :class:`~sparsemm_kernels.nn.MoTFeedForward`); ``kwargs`` as the constructor (routers freshly
        initialised)."""
        from sparsemm_kernels.nn.mot import MoTFeedForward

        if not isinstance(ffn, MoTFeedForward):
            raise TypeError(f"`ffn` must be a MoTFeedForward, got {type(ffn).__name__}")
        experts = _check_experts_per_modality(experts_per_modality)
        if len(experts) != ffn.num_modalities:
            raise ValueError(f"`experts_per_modality` has {len(experts)} groups but `ffn` has "
                             f"{ffn.num_modalities} modalities")
        w = ffn.w1
        new = cls(ffn.dim, ffn.hidden_dim, experts, device=w.device, dtype=w.dtype, **kwargs)
        with torch.no_grad():
            for name in ("w1", "w3", "w2"):
                src = getattr(ffn, name)
                getattr(new, name).copy_(src.index_select(0, new.expert_group.to(src.device)))
        return new

    def _scores(self, x2d: torch.Tensor) -> torch.Tensor:
        logits = [router_logits(r, x2d) for r in self.routers]
        if self.gate == "sigmoid":
            return torch.sigmoid(torch.cat(logits, dim=1))
        return torch.cat([torch.softmax(v, dim=-1) for v in logits], dim=1)

    def _aux_logits(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.logits(x2d) for a in self.aux_routers], dim=1)

    def _aux_loss(self, x2d: torch.Tensor, member: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy of the aux routers on detached inputs against the expert-choice membership
        ``member [N, E]`` (bool), over each token's own group (the other groups' experts never see it)."""
        logits = self._aux_logits(x2d.detach()).float()
        bce = F.binary_cross_entropy_with_logits(logits, member.float(), reduction="none")
        weight = eligible.to(bce.dtype)
        return (bce * weight).sum() / weight.sum().clamp(min=1.0)

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor,
        plan=None,
        token_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``[..., dim]``; modality_ids: ``x.shape[:-1]`` ints in ``[0, M)``; plan: a
        ``group_plan(modality_ids, M)`` to reuse (its counts give ``b_m``); token_mask: optional bool
        ``x.shape[:-1]`` (False: never routed, output 0; masked tokens still count in ``b_m``).
        Returns ``[..., dim]``."""
        from sparsemm_kernels.nn.mot import _resolve_plan
        from sparsemm_kernels.plan import checked_ids

        x2 = _flat_tokens(x, self.dim)
        if not isinstance(modality_ids, torch.Tensor) or tuple(modality_ids.shape) != tuple(x.shape[:-1]):
            shape = tuple(modality_ids.shape) if isinstance(modality_ids, torch.Tensor) else type(modality_ids)
            raise ValueError(f"`modality_ids` must have shape {tuple(x.shape[:-1])}, got {shape}")
        N, M, E = x2.shape[0], self.num_modalities, self.num_experts
        # The ids are range-checked once (ValueError / device assertion); b_m from the plan's counts.
        if M == 1:
            ids = checked_ids(modality_ids, 1, validate=None, name="modality_ids")
            counts = torch.full((1,), N, dtype=torch.int64, device=x2.device)
        else:  # the caller's plan built from these very ids is not checked again
            plan, ids = _resolve_plan(modality_ids, M, plan, self.backend)
            counts = plan.counts
        ids = ids.reshape(-1)
        token_mask = _flat_mask(token_mask, x)
        if N == 0:
            return _no_tokens(self, x)
        grp = self.expert_group
        # C_m on the device from b_m; the static bound of each expert's slots from N.
        b = counts.to(torch.int64)
        cap = self._capacities(b)
        bound = max(expert_capacity(self.capacity_factor, N, e) for e in self.experts_per_modality)
        eligible = ids[:, None] == grp[None, :]  # [N, E]: an expert sees its group's tokens only
        if token_mask is not None:
            eligible = eligible & token_mask[:, None]
        s = self._scores(x2)
        causal = self.causal_routing and self.aux_routers is not None
        if causal:  # every token of the group its aux router sends there: up to N per expert
            aux = self._aux_logits(x2)
            bound, rows = N, E * N
            idx, gates = _route(s, N, eligible & (aux > 0), None, None, None)
        elif group_size(self.selection_group) > 1:
            idx, gates, bound, rows = self._route_over_group(s, b, eligible, N)
        else:
            idx, gates = _route(s, bound, eligible, cap[grp], None, None)  # [E, bound], -1 past C_m
            # Pack each expert's rows after the previous expert's: offsets on the device, the buffer sized by the
            # bound sum_e C_e <= c * N + E; the rows past the last expert's are zero and go to the last expert.
            rows = min(math.ceil(self.capacity_factor * N) + E, E * bound)
        filled = (idx >= 0).sum(1)
        starts = torch.cumsum(filled, 0) - filled
        offsets = torch.cat([starts, starts.new_full((1,), rows)])
        position = torch.where(idx >= 0, starts[:, None] + torch.arange(bound, device=x2.device)[None, :], rows)
        slots = torch.full((rows + 1,), -1, dtype=torch.int64, device=x2.device)
        slots.index_put_((position.reshape(-1),), idx.reshape(-1))  # empty slots all land in the extra row
        slots = slots[:rows]
        slot_gates = torch.zeros(rows + 1, dtype=gates.dtype, device=x2.device).index_put(
            (position.reshape(-1),), gates.reshape(-1))[:rows]  # differentiable: each position written once
        inverse = slot_inverse(idx, N, position)
        self.aux_loss = None
        if self.aux_routers is not None and self.training and not causal:
            self.aux_loss = self._aux_loss(x2, inverse >= 0, eligible)
        return _experts_swiglu(self, x2, slots, inverse, slot_gates, offsets).view(x.shape)

    def _capacities(self, b: torch.Tensor) -> torch.Tensor:
        """``C_m = min(max(ceil(c * b_m / E_m), 1), b_m)`` per group on the device (0 when ``b_m = 0``)."""
        cap = torch.ceil(self.capacity_factor * b.to(torch.float64) / self.group_sizes).to(torch.int64)
        return torch.minimum(cap.clamp(min=1), b)

    def _route_over_group(self, s, counts, eligible, N: int):
        """Expert choice over every rank's tokens of each modality (see ``selection_group``): ``(idx [E, L] this
        rank's tokens per expert, ascending, -1 after; gates; L; rows of the packed buffer)``."""
        dist, group = torch.distributed, self.selection_group
        W, rank = dist.get_world_size(group), dist.get_rank(group)
        E, grp = self.num_experts, self.expert_group
        b = counts.clone()
        dist.all_reduce(b, group=group)  # b_m over the ranks
        cap = self._capacities(b)
        bound = max(expert_capacity(self.capacity_factor, W * N, e) for e in self.experts_per_modality)
        chosen, _ = _route(all_gather_rows(s, group), bound, all_gather_rows(eligible, group), cap[grp], None, None)
        # Every expert's row is ascending with -1 after: this rank's tokens are one contiguous run of it.
        L = min(bound, N)
        local, valid = rank_share(torch.where(chosen >= 0, chosen, W * N), rank * N, (rank + 1) * N, L)
        idx = torch.where(valid, local, -1)
        return idx, gather_gates(s, idx), L, min(math.ceil(self.capacity_factor * W * N) + E, E * L)

    def extra_repr(self) -> str:
        return (f"{self.dim}, hidden_dim={self.hidden_dim}, experts_per_modality={self.experts_per_modality}, "
                f"capacity_factor={self.capacity_factor}, gate={self.gate!r}")
