"""Pallas kernels for efficient-attention (GPU through Triton / Mosaic GPU, TPU through Mosaic).

Each kernel file ends with its fp32 `*_reference`.
"""

from pallas.flash_attention import BlockSizes, flash_attention, flash_attention_reference

__all__ = ["BlockSizes", "flash_attention", "flash_attention_reference"]
