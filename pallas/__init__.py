"""Pallas kernels for efficient-attention (GPU through Triton / Mosaic GPU, TPU through Mosaic).

One module per attention family (`softmax`, `block_sparse`, `linear`, `favor`, and
`gated` for gated linear attention and the delta rule),
each ending with the family's reference; the pieces they share sit in `common`
(the contract's checks, also used by `efficient_attention`), `tiling` and
`flash_tiles`. Nothing here imports `efficient_attention` or Flax.
"""

from pallas.block_layout import BlockLayout, layout_mask
from pallas.block_sparse import block_sparse_attention, block_sparse_attention_reference
from pallas.favor import (
    FeatureBlockSizes,
    causal_favor_attention,
    positive_features,
    positive_features_reference,
)
from pallas.gated import (
    GatedBlockSizes,
    delta_rule,
    delta_rule_factors,
    delta_rule_recurrence,
    gated_linear_attention,
    gated_linear_attention_reference,
)
from pallas.linear import (
    LinearBlockSizes,
    causal_linear_attention,
    kernel_attention_reference,
)
from pallas.softmax import (
    BlockSizes,
    flash_attention,
    softmax_attention_reference,
)

__all__ = [
    "BlockLayout",
    "BlockSizes",
    "FeatureBlockSizes",
    "GatedBlockSizes",
    "LinearBlockSizes",
    "block_sparse_attention",
    "block_sparse_attention_reference",
    "causal_favor_attention",
    "causal_linear_attention",
    "delta_rule",
    "delta_rule_factors",
    "delta_rule_recurrence",
    "flash_attention",
    "gated_linear_attention",
    "gated_linear_attention_reference",
    "kernel_attention_reference",
    "layout_mask",
    "positive_features",
    "positive_features_reference",
    "softmax_attention_reference",
]
