"""DeepSeek-V2 / V2-Lite: MLA attention, group-limited greedy routing, shared experts, first-k dense layers."""

from __future__ import annotations

from epsjax.models.config import ConfigError, MLAConfig, ModelConfig, RopeConfig, RouterConfig
from epsjax.models.families import common, mixtral, qwen3_moe


def config_from_hf(hf: dict, *, dtype: str) -> ModelConfig:
    f = common.HFFields(hf)
    if f.bool("attention_bias"):
        raise ConfigError("field attention_bias: true is not supported (only false)")
    layers, first_dense = f.int("num_hidden_layers"), f.int("first_k_dense_replace", 0, min=0)
    freq = f.int("moe_layer_freq", 1)
    if first_dense >= layers:
        raise ConfigError(f"field first_k_dense_replace={first_dense}: every one of the {layers} layers is dense (an "
                          "MoE model needs at least one MoE layer)")
    if freq == 1:  # the released layout: no work proportional to num_hidden_layers before it meets the checkpoint
        dense = tuple(range(first_dense))
    else:
        dense = tuple(l for l in range(layers) if l < first_dense or l % freq != 0)
    top_k = f.int("num_experts_per_tok")
    grouped = f.str("topk_method", "greedy", choices=("greedy", "group_limited_greedy")) == "group_limited_greedy"
    # DeepSeek-V2 either renormalises the top-k weights or scales them by routed_scaling_factor, never both.
    renormalise = f.bool("norm_topk_prob") and top_k > 1
    router = RouterConfig(
        top_k=top_k, topk_norm_p=1.0 if renormalise else None,
        n_group=f.int("n_group", 1) if grouped else 1, topk_group=f.int("topk_group", 1) if grouped else 1,
        routed_scaling_factor=1.0 if renormalise else f.float("routed_scaling_factor", 1.0))
    mla = MLAConfig(q_lora_rank=f.optional_int("q_lora_rank"), kv_lora_rank=f.int("kv_lora_rank"),
                    qk_nope_head_dim=f.int("qk_nope_head_dim"), qk_rope_head_dim=f.int("qk_rope_head_dim"),
                    v_head_dim=f.int("v_head_dim"))
    heads, expert_ffn = f.int("num_attention_heads"), f.int("moe_intermediate_size")
    return ModelConfig(
        name="deepseek_v2", family="deepseek_v2", vocab_size=f.int("vocab_size"), d_model=f.int("hidden_size"),
        num_layers=layers, num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads),
        head_dim=mla.qk_head_dim, num_experts=f.int("n_routed_experts"), expert_ffn_dim=expert_ffn,
        dense_ffn_dim=f.int("intermediate_size"), shared_ffn_dim=f.int("n_shared_experts", 0, min=0) * expert_ffn,
        dense_layers=dense, router=router, mla=mla,
        rope=RopeConfig(layout="interleaved", **common.rope_from_hf(f)), norm_eps=f.float("rms_norm_eps", 1e-6),
        max_seq_len=f.int("max_position_embeddings", 4096), tie_embeddings=f.bool("tie_word_embeddings"),
        pad_token_id=f.token_id("pad_token_id") or 0, eos_token_id=f.token_id("eos_token_id"), dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict:
    m, r = cfg.mla, cfg.router
    first_dense = len(cfg.dense_layers)
    if cfg.dense_layers != tuple(range(first_dense)):
        raise ConfigError(f"DeepSeek-V2 checkpoints express dense layers as a prefix, got {cfg.dense_layers}")
    return {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.dense_ffn_dim, "moe_intermediate_size": cfg.expert_ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "n_routed_experts": cfg.num_experts,
        "n_shared_experts": cfg.shared_ffn_dim // cfg.expert_ffn_dim, "num_experts_per_tok": r.top_k,
        "topk_method": "group_limited_greedy" if r.n_group > 1 else "greedy", "n_group": r.n_group,
        "topk_group": r.topk_group, "routed_scaling_factor": r.routed_scaling_factor,
        "norm_topk_prob": r.topk_norm_p is not None, "first_k_dense_replace": first_dense, "moe_layer_freq": 1,
        "q_lora_rank": m.q_lora_rank, "kv_lora_rank": m.kv_lora_rank, "qk_nope_head_dim": m.qk_nope_head_dim,
        "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "attention_bias": False,
        "torch_dtype": common.hf_dtype_name(cfg.dtype), **common.rope_to_hf(cfg.rope)}


LAYOUT = common.Layout(layer_prefix="model.layers.", layers_field="num_hidden_layers",
                       experts_field="n_routed_experts", router="mlp.gate.weight",
                       dense_field="first_k_dense_replace / moe_layer_freq")


def size_fields(cfg: ModelConfig) -> list[common.SizeField]:
    """config.json's sizes as the tensors show them (epsjax.checkpoint_sizes checks them from the headers)."""
    layers, prefix, m, N = range(cfg.num_layers), LAYOUT.layer_prefix, cfg.mla, cfg.num_heads
    moe = [l for l in layers if cfg.is_moe_layer(l)]
    dense = [l for l in layers if not cfg.is_moe_layer(l)]
    norms = (common.per_layer(prefix, layers, "input_layernorm.weight", 0)
             + common.per_layer(prefix, layers, "post_attention_layernorm.weight", 0))
    attn = lambda suffix, dim: common.per_layer(prefix, layers, f"self_attn.{suffix}", dim)  # noqa: E731
    fields = [*common.embedding_sizes(cfg, embed="model.embed_tokens.weight", norm="model.norm.weight",
                                      lm_head="lm_head.weight", layer_norms=norms),
              *qwen3_moe.moe_sizes(cfg, prefix, moe, dense, LAYOUT.experts_field),
              common.SizeField("kv_lora_rank", m.kv_lora_rank, attn("kv_a_layernorm.weight", 0)),
              common.SizeField("qk_rope_head_dim", m.qk_rope_head_dim, attn("kv_a_proj_with_mqa.weight", 0),
                               offset=m.kv_lora_rank, how=f" (+ kv_lora_rank {m.kv_lora_rank} rows of "
                                                         "kv_a_proj_with_mqa)")]
    if m.q_lora_rank is not None:
        fields.append(common.SizeField("q_lora_rank", m.q_lora_rank, attn("q_a_layernorm.weight", 0)))
    q = attn("q_proj.weight", 0) if m.q_lora_rank is None else attn("q_b_proj.weight", 0)
    return fields + [
        common.SizeField("num_attention_heads", N, q, factor=m.qk_head_dim,
                         how=f" (x qk_nope_head_dim + qk_rope_head_dim = {m.qk_head_dim} rows of the query)"),
        common.SizeField("v_head_dim", m.v_head_dim, attn("o_proj.weight", 1), factor=N,
                         how=f" (x num_attention_heads {N} columns of o_proj)"),
        common.SizeField("qk_nope_head_dim", m.qk_nope_head_dim, attn("kv_b_proj.weight", 0), factor=N,
                         offset=N * m.v_head_dim, how=f" (+ v_head_dim {m.v_head_dim}, x num_attention_heads {N} "
                                                   "rows of kv_b_proj)"),
    ]


def mla_rules(cfg: ModelConfig, prefix: str, path) -> list[common.TensorRule]:
    m, D, N = cfg.mla, cfg.d_model, cfg.num_heads
    attn = path + ("attn",)
    if m.q_lora_rank is None:
        rules = [common.linear(prefix + "q_proj.weight", attn + ("q_DNH",), (D, N, m.qk_head_dim))]
    else:
        rules = [common.linear(prefix + "q_a_proj.weight", attn + ("q_a_DQ",), (D, m.q_lora_rank)),
                 common.identity(prefix + "q_a_layernorm.weight", attn + ("q_a_norm", "scale"), (m.q_lora_rank,)),
                 common.linear(prefix + "q_b_proj.weight", attn + ("q_b_QNH",), (m.q_lora_rank, N, m.qk_head_dim))]
    return rules + [
        common.linear(prefix + "kv_a_proj_with_mqa.weight", attn + ("kv_a_DC",),
                      (D, m.kv_lora_rank + m.qk_rope_head_dim)),
        common.identity(prefix + "kv_a_layernorm.weight", attn + ("kv_a_norm", "scale"), (m.kv_lora_rank,)),
        common.linear(prefix + "kv_b_proj.weight", attn + ("kv_b_CNH",),
                      (m.kv_lora_rank, N, m.qk_nope_head_dim + m.v_head_dim)),
        common.linear(prefix + "o_proj.weight", attn + ("o_NVD",), (N, m.v_head_dim, D), n_in=2),
    ]


def tensor_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    rules = mixtral.embedding_rules(cfg)
    for layer in range(cfg.num_layers):
        prefix, path = f"model.layers.{layer}.", ("layers", layer)
        rules += [
            *common.llama_layer_norms(prefix, path, cfg.d_model),
            *mla_rules(cfg, prefix + "self_attn.", path),
            *qwen3_moe.mlp_rules(cfg, layer, prefix + "mlp.", path),
        ]
    return rules
