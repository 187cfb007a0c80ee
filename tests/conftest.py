"""Shared test settings: rank promotion raises, so any implicit axis broadcast is a bug."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
