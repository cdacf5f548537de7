"""sparsemm_kernels: GPU kernels for sparse and modality-aware transformer layers.

Every routed layer is plan -> one grouped GEMM -> combine:

* :func:`group_plan` sorts rows by group id on the device (no host sync) into a reusable :class:`GroupPlan`;
* :func:`grouped_mm` / :func:`grouped_linear` / :func:`modality_linear` run one grouped GEMM over all groups
  (:func:`grouped_linears`: several weights on one input, e.g. Q/K/V, as one op; :func:`grouped_swiglu_ffn`:
  a whole SwiGLU FFN per group as one op);
* :func:`modality_rms_norm` / :func:`modality_layer_norm` / :func:`swiglu` are the fused per-row pieces of a
  Mixture-of-Transformers block, and :func:`grouped_rms_norm` / :func:`grouped_layer_norm` the norms of rows
  already grouped;
* :func:`expert_choice_route` lets every expert pick its top-``capacity`` tokens (the expert-major plan of an
  expert-choice MoE);
* :func:`sort_rows` / :func:`unsort_rows` move rows between token order and the plan's group order (the
  group-sorted stream of :class:`~sparsemm_kernels.nn.MoTTransformer`);
* :mod:`sparsemm_kernels.nn` holds drop-in modules (:class:`~sparsemm_kernels.nn.MoTLinear`, ...).

Backends (``backend=`` or ``SPARSEMM_BACKEND``): see :mod:`sparsemm_kernels.backend`.
"""

from sparsemm_kernels import nn
from sparsemm_kernels.backend import BACKENDS, BackendUnavailableError, available_backends, select_backend
from sparsemm_kernels.nn.btx import btx_merge
from sparsemm_kernels.ops.avgk import avgk_ffn, avgk_select
from sparsemm_kernels.ops.grouped_ffn import grouped_swiglu_ffn
from sparsemm_kernels.ops.grouped_linear import grouped_linear, grouped_mm
from sparsemm_kernels.ops.grouped_linears import grouped_linears
from sparsemm_kernels.ops.mod_routing import mod_route
from sparsemm_kernels.ops.modality_linear import modality_linear
from sparsemm_kernels.ops.norms import grouped_layer_norm, grouped_rms_norm, modality_layer_norm, modality_rms_norm
from sparsemm_kernels.ops.permute import sort_rows, unsort_rows
from sparsemm_kernels.ops.routing import expert_choice_route
from sparsemm_kernels.ops.swiglu import silu_mul, swiglu
from sparsemm_kernels.ops.token_routing import token_choice_route
from sparsemm_kernels.plan import GroupPlan, group_plan

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "GroupPlan",
    "__version__",
    "available_backends",
    "avgk_ffn",
    "avgk_select",
    "btx_merge",
    "expert_choice_route",
    "group_plan",
    "grouped_layer_norm",
    "grouped_linear",
    "grouped_linears",
    "grouped_mm",
    "grouped_rms_norm",
    "grouped_swiglu_ffn",
    "modality_layer_norm",
    "mod_route",
    "modality_linear",
    "modality_rms_norm",
    "nn",
    "select_backend",
    "silu_mul",
    "sort_rows",
    "swiglu",
    "token_choice_route",
    "unsort_rows",
]
