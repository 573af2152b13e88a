"""The sampler epsjax had before sampling settings became data: one key and one setting for a whole batch. Kept as
the reference the per-row sampler must equal on a batch of one (epsjax.generation.sample)."""

import jax
import jax.numpy as jnp


def sample(logits_BV, key, sampling):
    """Next tokens [B] int32 from last-position logits [B, V] (temperature, then top-p), one key for the batch."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        threshold_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), axis=-1,
                               keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)
