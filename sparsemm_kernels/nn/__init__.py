"""Drop-in ``torch.nn`` modules whose forward reads like the papers' equations."""

from sparsemm_kernels.nn.avgk import AvgKFeedForward
from sparsemm_kernels.nn.mod import MixtureOfDepths
from sparsemm_kernels.nn.moe import ExpertChoiceMoE, MoMaFeedForward
from sparsemm_kernels.nn.moma import MoMaBlock, MoMaTransformer
from sparsemm_kernels.nn.mot import DenseBlock, MoTAttention, MoTBlock, MoTFeedForward, MoTTransformer
from sparsemm_kernels.nn.mot_linear import MoTLinear
from sparsemm_kernels.nn.norms import MoTLayerNorm, MoTRMSNorm
from sparsemm_kernels.nn.token_choice import TokenChoiceMoE

__all__ = [
    "AvgKFeedForward",
    "DenseBlock",
    "ExpertChoiceMoE",
    "MixtureOfDepths",
    "MoMaBlock",
    "MoMaFeedForward",
    "MoMaTransformer",
    "MoTAttention",
    "MoTBlock",
    "MoTFeedForward",
    "MoTLayerNorm",
    "MoTLinear",
    "MoTRMSNorm",
    "MoTTransformer",
    "TokenChoiceMoE",
]
