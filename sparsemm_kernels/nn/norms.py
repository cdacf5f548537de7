"""MoTRMSNorm / MoTLayerNorm: one norm per modality, applied to mixed-modality tokens in one fused kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.ops.norms import check_eps, modality_layer_norm, modality_rms_norm, plan_norm
from sparsemm_kernels.plan import GroupPlan, check_sorted_rows
from sparsemm_kernels.utils.checks import autocast_to, check_float_tensor, check_positive_int, check_same_dtype


def _resolve_ids(x: torch.Tensor, modality_ids: torch.Tensor | None, num_modalities: int) -> torch.Tensor:
    """``modality_ids`` as given; with one modality, None means every row is modality 0."""
    if modality_ids is not None:
        return modality_ids
    if num_modalities > 1:
        raise ValueError(f"`modality_ids` is required with num_modalities={num_modalities}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    return torch.zeros(x.shape[:-1], dtype=torch.int32, device=x.device)


def _dense_input(x, dim: int, *params: torch.Tensor | None):
    """Checks for the one-modality path, which runs torch's dense norm directly: ``(x, *params)``, in float32
    under autocast (as the per-modality ops run, and as torch's own layer_norm does on CUDA)."""
    check_float_tensor(x, "x")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"`x` must have last dimension {dim}, got shape {tuple(x.shape)}")
    x, *params = autocast_to(x, *params, policy="fp32")
    for name, p in zip(("weight", "bias"), params):
        if p is not None:
            check_same_dtype("x", x, name, p)
    return x, *params


def _no_residual(residual) -> None:
    if residual is not None:
        raise ValueError("`residual` is taken with sorted rows only (forward_sorted)")


def _plus(residual: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """The one-modality path's residual add: as a plain dense block writes it."""
    return y if residual is None else residual + y


def _single_dim(norm: nn.Module, kind: str) -> int:
    """The one normalised dim of a dense ``norm`` with an elementwise affine weight."""
    shape = tuple(norm.normalized_shape)
    if len(shape) != 1:
        raise ValueError(f"`norm` must normalise over one dim, got normalized_shape={shape}")
    if norm.weight is None:
        raise ValueError(f"`norm` must have elementwise_affine=True (a {kind} weight to copy)")
    return shape[0]


class MoTRMSNorm(nn.Module):
    """Modality-untied RMSNorm (Mixture-of-Transformers): token ``i`` uses ``weight[m_i]``.

    ``y = x / sqrt(mean_d(x^2) + eps) * weight[m]`` over the last dim, statistics in float32.

    Args:
        dim: the normalised size ``D`` (``d_h`` for QK-norm).
        num_modalities: ``M``, the number of weight copies.
        eps: added to the mean square.
        device, dtype: parameter factory kwargs.
        backend: the backend this module's op prefers (default: automatic); where it has no implementation
            the automatic choice runs instead (see :mod:`sparsemm_kernels.backend`).

    Parameters:
        weight: ``(M, dim)``, initialised to ones.
    """

    def __init__(
        self,
        dim: int,
        num_modalities: int,
        eps: float = 1e-5,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, "dim")
        self.num_modalities = check_positive_int(num_modalities, "num_modalities")
        self.eps = check_eps(eps)
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(torch.empty(num_modalities, dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Every modality's weight to one, as ``nn.RMSNorm``."""
        nn.init.ones_(self.weight)

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        *,
        validate: bool | None = None,
        plan: GroupPlan | None = None,
        sorted_rows: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: ``(..., dim)`` with modality_ids ``x.shape[:-1]``, or ``(..., H, dim)`` with modality_ids
        ``x.shape[:-2]`` (per-head QK-norm); ids in ``[0, M)``. With one modality the ids are not needed and
        the dense ``F.rms_norm`` runs. ``validate``: as in :func:`~sparsemm_kernels.modality_rms_norm`.
        ``sorted_rows=True``: ``x (T, dim)`` rows in ``plan`` order instead, and ``residual`` taken (see
        :meth:`forward_sorted`).
        Returns ``x.shape`` in x's dtype."""
        if sorted_rows:
            return self._sorted(x, plan, residual)
        _no_residual(residual)
        if self.num_modalities == 1:
            x, weight = _dense_input(x, self.dim, self.weight.squeeze(0))  # a view: see nn.mot._only
            return F.rms_norm(x, (self.dim,), weight, self.eps)
        ids = _resolve_ids(x, modality_ids, self.num_modalities)
        return modality_rms_norm(x, ids, self.weight, self.eps, backend=prefer(self.backend), validate=validate)

    def forward_sorted(
        self, x: torch.Tensor, plan: GroupPlan | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The sorted-rows entry point: ``x (T, dim)`` rows in ``plan`` order (``plan=None`` with one
        modality) -> ``(T, dim)``: :func:`~sparsemm_kernels.grouped_rms_norm` over the plan's offsets; with
        ``residual`` (``x``'s shape) ``residual + norm(x)``, the post-norm residual add fused into the norm's
        output. A module call (``self(x, plan=plan, sorted_rows=True, residual=residual)``), so hooks run as for
        :meth:`forward`."""
        return self(x, plan=plan, sorted_rows=True, residual=residual)

    def _sorted(self, x: torch.Tensor, plan: GroupPlan | None, residual: torch.Tensor | None) -> torch.Tensor:
        if self.num_modalities == 1:
            return _plus(residual, self.forward(x))
        check_sorted_rows(x, plan, self.num_modalities, self.dim, "norm")
        return plan_norm(x, self.weight, None, plan, self.eps, True, prefer(self.backend), residual)

    @classmethod
    def from_norm(cls, norm: nn.RMSNorm, num_modalities: int, *, backend: str | None = None) -> MoTRMSNorm:
        """A MoTRMSNorm whose every modality starts as a copy of the dense ``norm`` (``eps=None`` becomes
        ``torch.finfo(weight.dtype).eps``, what ``nn.RMSNorm`` uses then)."""
        if not isinstance(norm, nn.RMSNorm):
            raise TypeError(f"`norm` must be an nn.RMSNorm, got {type(norm).__name__}")
        dim = _single_dim(norm, "RMSNorm")
        w = norm.weight
        eps = norm.eps if norm.eps is not None else torch.finfo(w.dtype).eps
        module = cls(dim, num_modalities, eps, device=w.device, dtype=w.dtype, backend=backend)
        with torch.no_grad():
            module.weight.copy_(w.detach().unsqueeze(0).expand_as(module.weight))
        return module

    def extra_repr(self) -> str:
        return f"{self.dim}, num_modalities={self.num_modalities}, eps={self.eps}"


class MoTLayerNorm(nn.Module):
    """Modality-untied LayerNorm: token ``i`` uses ``weight[m_i]`` and ``bias[m_i]``.

    ``y = (x - mean_d(x)) / sqrt(var_d(x) + eps) * weight[m] + bias[m]`` (biased variance, as ``nn.LayerNorm``).

    Args:
        dim, num_modalities, eps, device, dtype, backend: as :class:`MoTRMSNorm`.
        bias: learn a per-modality bias.

    Parameters:
        weight: ``(M, dim)`` initialised to ones; bias: ``(M, dim)`` initialised to zeros, or None.
    """

    def __init__(
        self,
        dim: int,
        num_modalities: int,
        eps: float = 1e-5,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim = check_positive_int(dim, "dim")
        self.num_modalities = check_positive_int(num_modalities, "num_modalities")
        self.eps = check_eps(eps)
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(torch.empty(num_modalities, dim, **factory))
        self.bias = nn.Parameter(torch.empty(num_modalities, dim, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights to one and biases to zero for every modality, as ``nn.LayerNorm``."""
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(
        self,
        x: torch.Tensor,
        modality_ids: torch.Tensor | None = None,
        *,
        validate: bool | None = None,
        plan: GroupPlan | None = None,
        sorted_rows: bool = False,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Shapes, the one-modality dense path, ``validate``, ``plan`` and ``sorted_rows`` as
        :meth:`MoTRMSNorm.forward`. Returns ``x.shape`` in x's dtype."""
        if sorted_rows:
            return self._sorted(x, plan, residual)
        _no_residual(residual)
        if self.num_modalities == 1:
            bias = self.bias.squeeze(0) if self.bias is not None else None
            x, weight, bias = _dense_input(x, self.dim, self.weight.squeeze(0), bias)
            return F.layer_norm(x, (self.dim,), weight, bias, self.eps)
        ids = _resolve_ids(x, modality_ids, self.num_modalities)
        return modality_layer_norm(
            x, ids, self.weight, self.bias, self.eps, backend=prefer(self.backend), validate=validate
        )

    def forward_sorted(
        self, x: torch.Tensor, plan: GroupPlan | None, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The sorted-rows entry point, as :meth:`MoTRMSNorm.forward_sorted` (``residual`` too), with
        :func:`~sparsemm_kernels.grouped_layer_norm`."""
        return self(x, plan=plan, sorted_rows=True, residual=residual)

    def _sorted(self, x: torch.Tensor, plan: GroupPlan | None, residual: torch.Tensor | None) -> torch.Tensor:
        if self.num_modalities == 1:
            return _plus(residual, self.forward(x))
        check_sorted_rows(x, plan, self.num_modalities, self.dim, "norm")
        return plan_norm(x, self.weight, self.bias, plan, self.eps, False, prefer(self.backend), residual)

    @classmethod
    def from_norm(cls, norm: nn.LayerNorm, num_modalities: int, *, backend: str | None = None) -> MoTLayerNorm:
        """A MoTLayerNorm whose every modality starts as a copy of the dense ``norm`` (with or without bias)."""
        if not isinstance(norm, nn.LayerNorm):
            raise TypeError(f"`norm` must be an nn.LayerNorm, got {type(norm).__name__}")
        dim = _single_dim(norm, "LayerNorm")
        w = norm.weight
        module = cls(
            dim, num_modalities, norm.eps, bias=norm.bias is not None, device=w.device, dtype=w.dtype,
            backend=backend,
        )
        with torch.no_grad():
            module.weight.copy_(w.detach().unsqueeze(0).expand_as(module.weight))
            if norm.bias is not None:
                module.bias.copy_(norm.bias.detach().unsqueeze(0).expand_as(module.bias))
        return module

    def extra_repr(self) -> str:
        return f"{self.dim}, num_modalities={self.num_modalities}, eps={self.eps}, bias={self.bias is not None}"
