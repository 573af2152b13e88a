"""Attention's fast paths equal the plain computation: the heads-major layout, and causal prefills in query
blocks (each block attends only the keys up to its end)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epsjax.models import MoETransformer, get_preset
from epsjax.models import attention
from epsjax.models.attention import masked_softmax
from epsjax.models.transformer import prefill_mask
from epsjax.models import LocalExperts


def plain_attention(q_BTNH, k_BSKH, v_BSKV, mask_BTS, scale):
    """The textbook form: every query head against its key/value head, [B, N, T, S] scores."""
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    k_BSNH = jnp.repeat(k_BSKH, N // K, axis=2)
    v_BSNV = jnp.repeat(v_BSKV, N // K, axis=2)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q_BTNH, k_BSNH) * scale
    probs = masked_softmax(scores, mask_BTS[:, None])
    return jnp.einsum("BNTS,BSNV->BTNV", probs, v_BSNV)


@pytest.mark.parametrize("N,K", [(8, 2), (4, 4)])
def test_heads_major_attention_equals_the_plain_form(N, K):
    keys = jax.random.split(jax.random.key(0), 3)
    B, T, H, V = 2, 12, 16, 8
    q = jax.random.normal(keys[0], (B, T, N, H))
    k = jax.random.normal(keys[1], (B, T, K, H))
    v = jax.random.normal(keys[2], (B, T, K, V))
    valid = jnp.array([[False] * 3 + [True] * 9, [True] * 12])  # left padding in the first sequence
    mask = prefill_mask(valid)
    want = plain_attention(q, k, v, mask, H ** -0.5)
    np.testing.assert_allclose(attention.attend(q, k, v, mask, H ** -0.5), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-deepseek-v2"])  # GQA, MLA
def test_causal_query_blocks_give_the_same_logits(preset, monkeypatch):
    model = MoETransformer(get_preset(preset), rngs=nnx.Rngs(0))
    B, T = 2, 21
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, model.cfg.vocab_size)
    valid = jnp.ones((B, T), bool).at[0, :5].set(False)  # left padding
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    kw = dict(experts=LocalExperts(backend="reference"))
    full = model(tokens, positions, valid, prefill_mask(valid), **kw).logits
    monkeypatch.setattr(attention, "ATTENTION_BLOCK", 8)  # blocks of 8, 8, 5 queries
    blocked = model(tokens, positions, valid, prefill_mask(valid), causal=True, **kw).logits
    np.testing.assert_allclose(blocked[valid], full[valid], rtol=1e-5, atol=1e-5)
