"""Drop-in ``torch.nn`` modules whose forward reads like the papers' equations."""

from sparsemm_kernels.nn.mot_linear import MoTLinear

__all__ = ["MoTLinear"]
