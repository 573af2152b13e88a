"""DBRX: fused Wqkv with clip_qkv, bias-free LayerNorm, fused expert tensors [E*F, D], p-norm top-k weights."""

from __future__ import annotations

import numpy as np

from epsjax.models.config import ConfigError, ModelConfig, RopeConfig, RouterConfig
from epsjax.models.families import common


def config_from_hf(hf: dict, *, dtype: str) -> ModelConfig:
    f = common.HFFields(hf)
    attn, ffn = f.section("attn_config"), f.section("ffn_config")
    act = ffn.section("ffn_act_fn").str("name", "silu")
    if act != "silu":
        raise ConfigError(f"field ffn_config.ffn_act_fn.name must be silu (as released), got {act!r}")
    heads, d_model = f.int("n_heads"), f.int("d_model")
    # moe_normalize_expert_weights: absent means 1 (the p-norm), an explicit null means no renormalisation.
    explicit_null = "moe_normalize_expert_weights" in ffn.hf and ffn.hf["moe_normalize_expert_weights"] is None
    norm_p = None if explicit_null else ffn.float("moe_normalize_expert_weights", 1.0)
    return ModelConfig(
        name="dbrx", family="dbrx", vocab_size=f.int("vocab_size"), d_model=d_model, num_layers=f.int("n_layers"),
        num_heads=heads, num_kv_heads=attn.int("kv_n_heads", 1), head_dim=d_model // heads,
        num_experts=ffn.int("moe_num_experts"), expert_ffn_dim=ffn.int("ffn_hidden_size"),
        router=RouterConfig(top_k=ffn.int("moe_top_k"), topk_norm_p=norm_p),
        rope=RopeConfig(theta=attn.float("rope_theta", 10_000.0)), norm="layer", norm_eps=1e-5,
        clip_qkv=attn.float("clip_qkv") if attn.has("clip_qkv") else None, max_seq_len=f.int("max_seq_len", 2048),
        tie_embeddings=f.bool("tie_word_embeddings"),
        pad_token_id=f.token_id("pad_token_id") or 0, eos_token_id=f.token_id("eos_token_id"), dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["DbrxForCausalLM"], "model_type": "dbrx", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "n_layers": cfg.num_layers, "n_heads": cfg.num_heads, "max_seq_len": cfg.max_seq_len,
        "attn_config": {"kv_n_heads": cfg.num_kv_heads, "clip_qkv": cfg.clip_qkv, "rope_theta": cfg.rope.theta},
        "ffn_config": {"ffn_hidden_size": cfg.expert_ffn_dim, "moe_num_experts": cfg.num_experts,
                       "moe_top_k": cfg.router.top_k, "moe_normalize_expert_weights": cfg.router.topk_norm_p,
                       "ffn_act_fn": {"name": "silu"}},
        "tie_word_embeddings": cfg.tie_embeddings, "pad_token_id": cfg.pad_token_id,
        "eos_token_id": cfg.eos_token_id, "torch_dtype": common.hf_dtype_name(cfg.dtype)}


def _wqkv(name: str, path, D: int, N: int, K: int, H: int) -> common.TensorRule:
    """Wqkv [(N + 2K) * H, D] <-> q_DNH [D, N, H], k_DKH [D, K, H], v_DKH [D, K, H]."""
    def load(a):
        q, k, v = np.split(a[0], [N * H, (N + K) * H], axis=0)
        return [q.T.reshape(D, N, H), k.T.reshape(D, K, H), v.T.reshape(D, K, H)]

    def save(a):
        return [np.concatenate([w.reshape(D, -1).T for w in a], axis=0)]

    attn = path + ("attn",)
    paths = (attn + ("q_DNH",), attn + ("k_DKH",), attn + ("v_DKH",))
    return common.TensorRule((name,), (((N + 2 * K) * H, D),), paths, load=load, save=save)


def _experts(name: str, path, E: int, F: int, D: int, transpose: bool) -> common.TensorRule:
    """ffn.experts.mlp.{w1,v1} [E*F, D] <-> [E, D, F]; w2 [E*F, D] <-> [E, F, D]."""
    if transpose:
        load = lambda a: [np.ascontiguousarray(a[0].reshape(E, F, D).transpose(0, 2, 1))]
        save = lambda a: [np.ascontiguousarray(a[0].transpose(0, 2, 1)).reshape(E * F, D)]
    else:
        load = lambda a: [a[0].reshape(E, F, D)]
        save = lambda a: [a[0].reshape(E * F, D)]
    return common.TensorRule((name,), ((E * F, D),), (path,), load=load, save=save)


LAYOUT = common.Layout(layer_prefix="transformer.blocks.", layers_field="n_layers",
                       experts_field="ffn_config.moe_num_experts", router="ffn.router.layer.weight")


def size_fields(cfg: ModelConfig) -> list[common.SizeField]:
    """config.json's sizes as the tensors show them (epsjax.checkpoint_sizes checks them from the headers)."""
    layers, prefix, E, H, N = range(cfg.num_layers), LAYOUT.layer_prefix, cfg.num_experts, cfg.head_dim, cfg.num_heads
    norms = (common.per_layer(prefix, layers, "norm_attn_norm.norm_1.weight", 0)
             + common.per_layer(prefix, layers, "norm_attn_norm.norm_2.weight", 0))
    return [
        *common.embedding_sizes(cfg, embed="transformer.wte.weight", norm="transformer.norm_f.weight",
                                lm_head="lm_head.weight", layer_norms=norms, d_model_field="d_model"),
        common.SizeField(LAYOUT.experts_field, E, common.per_layer(prefix, layers, LAYOUT.router, 0)),
        common.SizeField("ffn_config.ffn_hidden_size", cfg.expert_ffn_dim,
                         common.per_layer(prefix, layers, "ffn.experts.mlp.w1", 0), factor=E,
                         how=f" (x moe_num_experts {E} rows of the fused experts)"),
        common.SizeField("attn_config.kv_n_heads", cfg.num_kv_heads,
                         common.per_layer(prefix, layers, "norm_attn_norm.attn.Wqkv.weight", 0), factor=2 * H,
                         offset=N * H, how=f" (Wqkv holds (n_heads {N} + 2 x kv_n_heads) x head_dim {H} rows)"),
    ]


def tensor_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    D, E, F = cfg.d_model, cfg.num_experts, cfg.expert_ffn_dim
    rules = [common.identity("transformer.wte.weight", ("embed", "embedding"), (cfg.vocab_size, D)),
             common.identity("transformer.norm_f.weight", ("final_norm", "scale"), (D,))]
    if not cfg.tie_embeddings:
        rules.append(common.linear("lm_head.weight", ("lm_head_DV",), (D, cfg.vocab_size)))
    for layer in range(cfg.num_layers):
        block, path = f"transformer.blocks.{layer}.", ("layers", layer)
        nan = block + "norm_attn_norm."
        moe = path + ("moe",)
        rules += [
            common.identity(nan + "norm_1.weight", path + ("attn_norm", "scale"), (D,)),
            common.identity(nan + "norm_2.weight", path + ("ffn_norm", "scale"), (D,)),
            _wqkv(nan + "attn.Wqkv.weight", path, D, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            common.linear(nan + "attn.out_proj.weight", path + ("attn", "o_NHD"), (cfg.num_heads, cfg.head_dim, D),
                          n_in=2),
            common.linear(block + "ffn.router.layer.weight", moe + ("router", "kernel_DE"), (D, E)),
            _experts(block + "ffn.experts.mlp.w1", moe + ("w_gate_EDF",), E, F, D, transpose=True),
            _experts(block + "ffn.experts.mlp.v1", moe + ("w_up_EDF",), E, F, D, transpose=True),
            _experts(block + "ffn.experts.mlp.w2", moe + ("w_down_EFD",), E, F, D, transpose=False),
        ]
    return rules
