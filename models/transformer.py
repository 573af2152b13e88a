"""Decoder layers and the whole MoE transformer (embedding -> layers -> norm -> LM head), with a KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from epsjax.models.attention import AttentionContext, make_attention
from epsjax.models.config import ModelConfig
from epsjax.models.layers import Embedding, GatedMLP, make_norm, param
from epsjax.models.moe import ExpertCompute, MoEBlock, MoEStats
from epsjax.sharding import axes


@dataclasses.dataclass(frozen=True)
class ForwardOutput:
    logits: jax.Array            # [B, T, V] float32 (T = 1 when only the last position was asked for)
    cache: list[dict] | None     # per layer: the attention's cache entries, [B, S, ...] each
    moe_stats: MoEStats          # stacked over MoE layers: tokens_per_expert [L_moe, E], dropped [L_moe]


jax.tree_util.register_dataclass(ForwardOutput, data_fields=["logits", "cache", "moe_stats"], meta_fields=[])


class DecoderLayer(nnx.Module):
    """Pre-norm attention, then a dense FFN or an MoE FFN (with Arctic's parallel dense residual if configured)."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        dt = cfg.jnp_dtype
        self.attn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ffn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
        self.moe = MoEBlock(cfg, rngs=rngs) if cfg.is_moe_layer(layer) else None
        self.mlp = None if cfg.is_moe_layer(layer) else GatedMLP(cfg.d_model, cfg.dense_ffn_dim, dtype=dt, rngs=rngs)
        if self.moe is not None and cfg.dense_residual:
            self.residual_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
            self.residual_mlp = GatedMLP(cfg.d_model, cfg.dense_ffn_dim, dtype=dt, rngs=rngs)
        else:
            self.residual_norm = self.residual_mlp = None

    def __call__(self, x_BTD, valid_BT, ctx: AttentionContext, cache_layer, experts: ExpertCompute):
        if self.moe is None:
            h_BTD, cache_layer = self.attention(x_BTD, ctx, cache_layer)
            return h_BTD + self.mlp(self.ffn_norm(h_BTD)), cache_layer, None
        # The staged forward every executor shares: the jitted program composes the three stages here; the
        # offload and DEP executors run the same stages as programs of their own, with their expert compute
        # (host-fed slot tables, or the expert group across a link) in the middle.
        h_BTD, moe_in_BTD, ids_TK, weights_TK, cache_layer = self.attend_route(x_BTD, ctx, cache_layer)
        B, T, D = x_BTD.shape
        routed_TD, stats = self.moe.routed(moe_in_BTD.reshape(B * T, D), ids_TK, weights_TK, valid_BT.reshape(B * T),
                                           experts)
        return self.finish(h_BTD, moe_in_BTD, routed_TD.reshape(B, T, D)), cache_layer, stats

    # The stages __call__ composes, for executors that drive an MoE layer step by step (epsjax/offload, epsjax/dep).

    def attend_route(self, x_BTD, ctx: AttentionContext, cache_layer):
        """Stage 1 of an MoE layer: attention plus its residual h, the MoE's input and the router's choice:
        h [B, T, D], moe_in [B, T, D], ids [B*T, K], weights [B*T, K] and the layer's updated cache."""
        h_BTD, cache_layer = self.attention(x_BTD, ctx, cache_layer)
        moe_in_BTD = self.moe_input(x_BTD, h_BTD)
        ids_TK, weights_TK = self.moe.route(moe_in_BTD)
        return h_BTD, moe_in_BTD, ids_TK, weights_TK, cache_layer

    def finish(self, h_BTD, moe_in_BTD, routed_BTD):
        """Stage 3: the routed experts' output plus the shared experts' on the MoE input, then the residuals."""
        return self.moe_output(h_BTD, self.moe.add_shared(moe_in_BTD, routed_BTD))

    def attention(self, x_BTD, ctx: AttentionContext, cache_layer):
        """Pre-norm attention plus its residual: h [B, T, D] and the layer's updated cache."""
        attn_BTD, cache_layer = self.attn(self.attn_norm(x_BTD), ctx, cache_layer)
        return x_BTD + attn_BTD, cache_layer

    def moe_input(self, x_BTD, h_BTD):
        """What the MoE reads: the normed attention output h, or (Arctic, in parallel with attention and the dense
        residual MLP) the normed layer input x."""
        return self.ffn_norm(x_BTD if self.residual_mlp is not None else h_BTD)

    def moe_output(self, h_BTD, moe_BTD):
        """The layer's output from h and the MoE block's output (Arctic adds its dense residual MLP on h)."""
        if self.residual_mlp is not None:
            return h_BTD + self.residual_mlp(self.residual_norm(h_BTD)) + moe_BTD
        return h_BTD + moe_BTD


def prefill_mask(valid_BT):
    """[B, T, T]: causal, and padding keys hidden."""
    T = valid_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    return causal_TT[None] & valid_BT[:, None, :]


def decode_mask(kv_valid_BS, write_index, num_new: int):
    """[B, T, S] for T new tokens written at slots write_index.. (one index [] or each row's own [B]): a query sees
    the valid slots up to its own."""
    S = kv_valid_BS.shape[1]
    query_slot_BT = jnp.reshape(write_index, (-1, 1)) + jnp.arange(num_new)  # [B or 1, T]
    return (jnp.arange(S) <= query_slot_BT[..., None]) & kv_valid_BS[:, None, :]


class MoETransformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt = cfg.jnp_dtype
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, dtype=dt, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, layer, rngs=rngs) for layer in range(cfg.num_layers)])
        self.final_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, dtype=dt, rngs=rngs)
        self.lm_head_DV = None if cfg.tie_embeddings else param(rngs, (cfg.d_model, cfg.vocab_size),
                                                                (axes.EMBED, axes.VOCAB), dt)

    def init_cache(self, batch: int, length: int) -> list[dict]:
        return [{name: jnp.zeros(shape, self.cfg.jnp_dtype) for name, shape in
                 layer.attn.cache_shapes(batch, length).items()} for layer in self.layers]

    def __call__(self, tokens_BT, positions_BT, valid_BT, mask_BTS, *, experts: ExpertCompute,
                 cache: list[dict] | None = None, write_index=0, attend_to_cache: bool = False,
                 last_logits_only: bool = False, causal: bool = False) -> ForwardOutput:
        """causal: mask_BTS is causal (prefill_mask), so attention may skip the keys after each query block."""
        ctx = AttentionContext(positions_BT=positions_BT, mask_BTS=mask_BTS, write_index=write_index,
                               attend_to_cache=attend_to_cache, causal=causal)
        x_BTD = self.embed(tokens_BT)
        new_cache, stats = [], []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x_BTD, layer_cache, layer_stats = layer(x_BTD, valid_BT, ctx, None if cache is None else cache[i],
                                                        experts)
            x_BTD = axes.constrain(x_BTD, (axes.BATCH, axes.SEQ, axes.ACT_EMBED))
            new_cache.append(layer_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        logits_BTV = self.logits(x_BTD, last_logits_only=last_logits_only)
        moe_stats = MoEStats(tokens_per_expert=jnp.stack([s.tokens_per_expert for s in stats]),
                             dropped=jnp.stack([s.dropped for s in stats]))
        return ForwardOutput(logits=logits_BTV, cache=None if cache is None else new_cache, moe_stats=moe_stats)

    def logits(self, x_BTD, *, last_logits_only: bool = False):
        """Final norm and LM head on the last layer's output: [B, T, V] float32 (T = 1 for the last position only)."""
        x_BTD = self.final_norm(x_BTD)
        if last_logits_only:
            x_BTD = x_BTD[:, -1:]
        head_DV = self.embed.embedding[...].T if self.lm_head_DV is None else self.lm_head_DV[...]
        with jax.named_scope("lm_head"):
            logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, head_DV, preferred_element_type=jnp.float32)
            return axes.constrain(logits_BTV, (axes.BATCH, axes.SEQ, axes.ACT_VOCAB))
