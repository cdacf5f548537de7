"""MoTLinear: one ``nn.Linear`` per modality, applied to mixed-modality tokens in one grouped GEMM."""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsemm_kernels.backend import check_backend_name, prefer
from sparsemm_kernels.ops.grouped_linear import grouped_linear
from sparsemm_kernels.ops.modality_linear import modality_linear
from sparsemm_kernels.plan import GroupPlan
from sparsemm_kernels.utils.checks import check_positive_int


def init_per_modality_(weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """Initialise each ``weight[m] (out, in)`` (and ``bias[m]``) independently, exactly as ``nn.Linear`` does."""
    bound = 1.0 / math.sqrt(weight.shape[-1])
    with torch.no_grad():
        for m in range(weight.shape[0]):
            nn.init.kaiming_uniform_(weight[m], a=math.sqrt(5))
            if bias is not None:
                nn.init.uniform_(bias[m], -bound, bound)


class MoTLinear(nn.Module):
    """Modality-untied linear layer (Mixture-of-Transformers): token ``i`` uses ``weight[m_i]``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        num_modalities: ``M``, the number of weight copies.
        bias: add a per-modality bias.
        device, dtype: parameter factory kwargs.
        backend: the backend this module's ops prefer (default: automatic); ops it does not implement fall
            back to the automatic choice (see :mod:`sparsemm_kernels.backend`).

    Parameters:
        weight: ``(M, out_features, in_features)``; bias: ``(M, out_features)`` or None. Each modality is
        initialised independently exactly as ``nn.Linear`` initialises its weight and bias.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_modalities: int,
        bias: bool = False,
        device=None,
        dtype=None,
        *,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        check_positive_int(num_modalities, "num_modalities")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.num_modalities = num_modalities
        self.backend = check_backend_name(backend)
        self.weight = nn.Parameter(torch.empty(num_modalities, out_features, in_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_modalities, out_features, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per modality, the ``nn.Linear`` initialisation: kaiming-uniform(a=sqrt(5)) weight, uniform bias."""
        init_per_modality_(self.weight, self.bias)

    def forward(
        self, x: torch.Tensor, modality_ids: torch.Tensor | None, plan: GroupPlan | None = None, *,
        sorted_rows: bool = False,
    ) -> torch.Tensor:
        """x: ``(..., in_features)``; modality_ids: ``x.shape[:-1]`` ints in ``[0, M)``; plan: optional
        reusable :class:`GroupPlan` of ``modality_ids``. ``sorted_rows=True``: ``x (T, in_features)`` rows in
        ``plan`` order instead, ``modality_ids`` unused (see :meth:`forward_sorted`). Returns
        ``(..., out_features)``."""
        if sorted_rows:
            return self._sorted(x, plan)
        return modality_linear(x, modality_ids, self.weight, self.bias, plan, backend=prefer(self.backend))

    def forward_sorted(self, x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        """The sorted-rows entry point: ``x (T, in_features)`` rows in ``plan`` order (group by group) ->
        ``(T, out_features)`` in the same order: one :func:`~sparsemm_kernels.grouped_mm` over the plan's
        offsets (:func:`~sparsemm_kernels.grouped_linear` with both orders ``"sorted"``), no gather or scatter.
        A module call (``self(x, None, plan, sorted_rows=True)``), so hooks run as for :meth:`forward`."""
        return self(x, None, plan, sorted_rows=True)

    def _sorted(self, x: torch.Tensor, plan: GroupPlan) -> torch.Tensor:
        return grouped_linear(x, self.weight, plan, self.bias, input_order="sorted", output_order="sorted",
                              backend=prefer(self.backend))

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_modalities: int, *, backend: str | None = None) -> MoTLinear:
        """A MoTLinear whose every modality starts as a copy of the dense ``linear``."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"`linear` must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        module = cls(
            linear.in_features, linear.out_features, num_modalities, bias=linear.bias is not None,
            device=w.device, dtype=w.dtype, backend=backend,
        )
        with torch.no_grad():
            module.weight.copy_(w.detach().unsqueeze(0).expand_as(module.weight))
            if linear.bias is not None:
                module.bias.copy_(linear.bias.detach().unsqueeze(0).expand_as(module.bias))
        return module

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"num_modalities={self.num_modalities}, bias={self.bias is not None}"
        )
