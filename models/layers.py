"""Small building blocks: parameter creation with logical axes, norms, embeddings, the gated MLP.

Shapes live in names: x_BTD is [batch, tokens, d_model]; see shared/architecture.md for the letters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from epsjax.sharding import axes

_INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape: tuple[int, ...], logical_axes: tuple[str | None, ...], dtype,
          *, std: float = _INIT_STD) -> nnx.Param:
    """A normal-initialised parameter annotated with logical axis names (mapped to a mesh by sharding/)."""
    if len(shape) != len(logical_axes):
        raise RuntimeError(f"{shape=} and {logical_axes=} differ in rank")  # a layer's code, not its config
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return _annotated(value, logical_axes)


def ones_param(shape: tuple[int, ...], logical_axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return _annotated(jnp.ones(shape, dtype), logical_axes)


def _annotated(value, logical_axes) -> nnx.Param:
    # Under a mesh (sharding/ sets one, with logical-axis rules) the value is created directly in its shards;
    # without one the annotation is only metadata.
    eager = not jax.sharding.get_abstract_mesh().empty
    return nnx.Param(value, out_sharding=logical_axes, eager_sharding=eager)


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, axis: str = axes.NORM, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = ones_param((dim,), (axis,), dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LayerNorm(nnx.Module):
    """Layer norm without bias (DBRX), computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype, axis: str = axes.NORM, rngs: nnx.Rngs):
        del rngs
        self.eps = eps
        self.scale = ones_param((dim,), (axis,), dtype)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype, rngs: nnx.Rngs, axis: str = axes.NORM):
    return (RMSNorm if kind == "rms" else LayerNorm)(dim, eps=eps, dtype=dtype, axis=axis, rngs=rngs)


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.embedding = param(rngs, (vocab_size, dim), (axes.VOCAB, axes.EMBED), dtype)

    def __call__(self, tokens_BT):
        return axes.constrain(jnp.take(self.embedding[...], tokens_BT, axis=0), (axes.BATCH, axes.SEQ, axes.ACT_EMBED))


class GatedMLP(nnx.Module):
    """down(silu(x @ gate) * (x @ up)): dense layers, DeepSeek's shared experts, Arctic's dense residual."""

    def __init__(self, d_model: int, ffn_dim: int, *, dtype, rngs: nnx.Rngs):
        self.gate_DF = param(rngs, (d_model, ffn_dim), (axes.EMBED, axes.MLP), dtype)
        self.up_DF = param(rngs, (d_model, ffn_dim), (axes.EMBED, axes.MLP), dtype)
        self.down_FD = param(rngs, (ffn_dim, d_model), (axes.MLP, axes.EMBED), dtype)

    def __call__(self, x_BTD):
        with jax.named_scope("gated_mlp"):
            gate_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.gate_DF[...])
            up_BTF = jnp.einsum("BTD,DF->BTF", x_BTD, self.up_DF[...])
            hidden_BTF = axes.constrain(jax.nn.silu(gate_BTF) * up_BTF, (axes.BATCH, axes.SEQ, axes.ACT_MLP))
            return jnp.einsum("BTF,FD->BTD", hidden_BTF, self.down_FD[...])
