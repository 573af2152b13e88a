"""Rotary position embeddings: rotate-half and interleaved-pair layouts, plain or YaRN-scaled frequencies."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from epsjax.models.config import ConfigError, RopeConfig


def inverse_frequencies(rope: RopeConfig, dim: int) -> np.ndarray:
    """[dim // 2] float32 inverse frequencies; YaRN blends interpolated and extrapolated ones per dimension."""
    if dim % 2:
        raise ConfigError(f"rotary dimension must be even, got {dim=}")
    exponents = np.arange(0, dim, 2, dtype=np.float32) / dim
    pos_freqs = rope.theta ** exponents
    extrapolated = 1.0 / pos_freqs
    if rope.yarn_factor is None:
        return extrapolated.astype(np.float32)
    interpolated = 1.0 / (rope.yarn_factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(rope.yarn_original_max_position / (num_rotations * 2 * math.pi)) / (
            2 * math.log(rope.theta))

    low = max(math.floor(correction_dim(rope.yarn_beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.yarn_beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    return (interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight).astype(np.float32)


def rotary_angles(rope: RopeConfig, dim: int, positions_BT):
    """cos, sin of shape [B, T, dim // 2] (float32), already multiplied by YaRN's attention factor."""
    inv_freq = jnp.asarray(inverse_frequencies(rope, dim))
    angles_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    scale = rope.attention_factor
    return jnp.cos(angles_BTh) * scale, jnp.sin(angles_BTh) * scale


def apply_rotary(x_BTNH, cos_BTh, sin_BTh, layout: str):
    """Rotates x (last dim H = 2h) by the angles; computed in float32, returned in x's dtype."""
    x = x_BTNH.astype(jnp.float32)
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    if layout == "rotate_half":
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    elif layout == "interleaved":
        real, imag = x[..., 0::2], x[..., 1::2]
        out = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1).reshape(x.shape)
    else:
        raise ConfigError(f"unknown rotary layout {layout!r}")
    return out.astype(x_BTNH.dtype)
