"""Plain-PyTorch truth for every op: loops a reviewer can check against the paper's equations.

These functions accept any float dtype (tests run them in float64), are differentiable through ordinary
autograd, and are the ``torch`` backend. They may read small index tensors on the host (a per-group loop
needs the group bounds), so on CUDA they are a correctness fallback, not a fast path.
"""

from sparsemm_kernels.reference.grouped import grouped_linear_ref, grouped_mm_dw_ref, grouped_mm_ref
from sparsemm_kernels.reference.mot import mot_attention_ref, mot_block_ref, mot_feed_forward_ref
from sparsemm_kernels.reference.norms import modality_layer_norm_ref, modality_norm_bwd_ref, modality_rms_norm_ref
from sparsemm_kernels.reference.plan import group_plan_ref
from sparsemm_kernels.reference.swiglu import silu_mul_bwd_ref, silu_mul_ref, swiglu_bwd_ref, swiglu_ref

__all__ = [
    "group_plan_ref",
    "grouped_linear_ref",
    "grouped_mm_dw_ref",
    "grouped_mm_ref",
    "modality_layer_norm_ref",
    "modality_norm_bwd_ref",
    "modality_rms_norm_ref",
    "mot_attention_ref",
    "mot_block_ref",
    "mot_feed_forward_ref",
    "silu_mul_bwd_ref",
    "silu_mul_ref",
    "swiglu_bwd_ref",
    "swiglu_ref",
]
