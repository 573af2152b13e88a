"""Top-k routers: softmax top-k (renormalised by a p-norm or not) and DeepSeek's group-limited greedy top-k.

Logits and probabilities are float32 whatever the model dtype, as every reference implementation does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from epsjax.models.config import RouterConfig
from epsjax.models.layers import param
from epsjax.sharding import axes


def route(logits_TE, router: RouterConfig):
    """Expert ids [T, K] int32 and routing weights [T, K] float32 from router logits [T, E]."""
    probs_TE = jax.nn.softmax(logits_TE.astype(jnp.float32), axis=-1)
    T, E = probs_TE.shape
    if router.n_group > 1:
        # Each group is scored by its best expert; experts outside the topk_group best groups are masked to 0
        # (as DeepSeek does; masked experts can still be picked if fewer than top_k remain, with weight 0).
        group_scores_TG = probs_TE.reshape(T, router.n_group, E // router.n_group).max(axis=-1)
        _, best_groups_Tg = jax.lax.top_k(group_scores_TG, router.topk_group)
        group_mask_TG = jnp.zeros_like(group_scores_TG, dtype=bool).at[
            jnp.arange(T)[:, None], best_groups_Tg].set(True)
        expert_mask_TE = jnp.repeat(group_mask_TG, E // router.n_group, axis=1)
        probs_TE = jnp.where(expert_mask_TE, probs_TE, 0.0)
    weights_TK, ids_TK = jax.lax.top_k(probs_TE, router.top_k)
    if router.topk_norm_p is not None:
        norm_T1 = jnp.sum(jnp.abs(weights_TK) ** router.topk_norm_p, axis=-1, keepdims=True) ** (
            1.0 / router.topk_norm_p)
        weights_TK = weights_TK / norm_T1
    return ids_TK.astype(jnp.int32), weights_TK * router.routed_scaling_factor


class Router(nnx.Module):
    def __init__(self, d_model: int, num_experts: int, router: RouterConfig, *, dtype, rngs: nnx.Rngs):
        self.config = router
        # Replicated: every device routes its own tokens over all experts.
        self.kernel_DE = param(rngs, (d_model, num_experts), (axes.EMBED, None), dtype)

    def __call__(self, x_TD):
        with jax.named_scope("router"):
            logits_TE = jnp.einsum("TD,DE->TE", x_TD.astype(jnp.float32), self.kernel_DE[...].astype(jnp.float32))
            return route(logits_TE, self.config)
