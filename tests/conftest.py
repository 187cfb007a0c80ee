"""Shared test settings.

Rank promotion raises, so any implicit axis broadcast is a bug. float32 matmuls
run at full precision (GPUs default to TF32), so float32 results can be held to
float32 tolerances against the float64 references.

On a machine without a CUDA plugin the tests run on the CPU, where compiling
dominates their time (small shapes): XLA's CPU backend then skips LLVM's
optimisation passes (a third less time for the suite; the values are the
same computation, checked against the same float64 references).
"""

import importlib.util
import os


def _installed(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:  # a missing parent package
    return False


def _cpu_only() -> bool:
  return not any(map(_installed, ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
                                  "jax_plugins.xla_cuda13")))


if _cpu_only():
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]))

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")
