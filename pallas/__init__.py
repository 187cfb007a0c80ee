"""Pallas kernels for efficient-attention (GPU through Triton / Mosaic GPU, TPU through Mosaic).

Each kernel file ends with its fp32 `*_reference`.
"""

from pallas.block_sparse import block_sparse_attention, block_sparse_attention_reference
from pallas.favor_features import (
    FeatureBlockSizes,
    causal_favor_attention,
    positive_features,
    positive_features_reference,
)
from pallas.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_reference,
)
from pallas.linear_attention import (
    LinearBlockSizes,
    causal_linear_attention,
    causal_linear_attention_reference,
)

__all__ = [
    "BlockSizes",
    "FeatureBlockSizes",
    "LinearBlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_favor_attention",
    "causal_linear_attention",
    "causal_linear_attention_reference",
    "flash_attention",
    "flash_attention_reference",
    "positive_features",
    "positive_features_reference",
]
