"""Shared test settings.

Rank promotion raises, so any implicit axis broadcast is a bug. float32 matmuls
run at full precision (GPUs default to TF32), so float32 results can be held to
float32 tolerances against the float64 references.
"""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
