"""Shared across the DEP runtime tests: the tiny models, built once per session (initializing one compiles a few
seconds of programs, and test_decode, test_placement and test_runtime all use the same two)."""

import functools

from flax import nnx

from epsjax.models import MoETransformer, get_preset


@functools.cache
def tiny_model(name: str) -> MoETransformer:
    """A tiny preset with the weights of nnx.Rngs(0) (never modified by the tests: they derive new models)."""
    return MoETransformer(get_preset(name), rngs=nnx.Rngs(0))
