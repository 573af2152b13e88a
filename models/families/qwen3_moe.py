"""Qwen3-MoE: GQA with per-head q/k RMSNorm, softmax top-k (optionally renormalised), some dense layers."""

from __future__ import annotations

from epsjax.models.config import ConfigError, ModelConfig, RopeConfig, RouterConfig
from epsjax.models.families import common, mixtral


def config_from_hf(hf: dict, *, dtype: str) -> ModelConfig:
    f = common.HFFields(hf)
    if f.bool("use_sliding_window"):
        raise ConfigError("field use_sliding_window: true (sliding-window attention) is not supported")
    if f.bool("attention_bias"):
        raise ConfigError("field attention_bias: true is not supported (only false)")
    layers, step = f.int("num_hidden_layers"), f.int("decoder_sparse_step", 1)
    mlp_only = set(f.int_list("mlp_only_layers"))
    if step == 1:  # the released layout: no work proportional to num_hidden_layers before it meets the checkpoint
        dense = tuple(sorted(l for l in mlp_only if l < layers))
    else:
        dense = tuple(l for l in range(layers) if l in mlp_only or (l + 1) % step != 0)
    heads, d_model = f.int("num_attention_heads"), f.int("hidden_size")
    # The Hub's config.json says num_experts; transformers 5 writes num_local_experts.
    experts = f.int("num_experts") if f.has("num_experts") else f.int("num_local_experts")
    return ModelConfig(
        name="qwen3_moe", family="qwen3_moe", vocab_size=f.int("vocab_size"), d_model=d_model,
        num_layers=layers, num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads),
        head_dim=f.int("head_dim", d_model // heads), num_experts=experts,
        expert_ffn_dim=f.int("moe_intermediate_size"), dense_ffn_dim=f.int("intermediate_size") if dense else 0,
        dense_layers=dense,
        router=RouterConfig(top_k=f.int("num_experts_per_tok"), topk_norm_p=1.0 if f.bool("norm_topk_prob") else None),
        rope=RopeConfig(**common.rope_from_hf(f)), qk_norm=True, norm_eps=f.float("rms_norm_eps", 1e-6),
        max_seq_len=f.int("max_position_embeddings", 4096), tie_embeddings=f.bool("tie_word_embeddings"),
        pad_token_id=f.token_id("pad_token_id") or 0, eos_token_id=f.token_id("eos_token_id"), dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.dense_ffn_dim or cfg.expert_ffn_dim,
        "moe_intermediate_size": cfg.expert_ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.router.top_k,
        "norm_topk_prob": cfg.router.topk_norm_p == 1.0, "decoder_sparse_step": 1,
        "mlp_only_layers": list(cfg.dense_layers), "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "use_sliding_window": False,
        "attention_bias": False, "torch_dtype": common.hf_dtype_name(cfg.dtype), **common.rope_to_hf(cfg.rope)}


LAYOUT = common.Layout(layer_prefix="model.layers.", layers_field="num_hidden_layers",
                       experts_field="num_experts (or num_local_experts)", router="mlp.gate.weight",
                       dense_field="mlp_only_layers / decoder_sparse_step")


def size_fields(cfg: ModelConfig) -> list[common.SizeField]:
    """config.json's sizes as the tensors show them (epsjax.checkpoint_sizes checks them from the headers)."""
    layers, prefix = range(cfg.num_layers), LAYOUT.layer_prefix
    moe = [l for l in layers if cfg.is_moe_layer(l)]
    dense = [l for l in layers if not cfg.is_moe_layer(l)]
    norms = (common.per_layer(prefix, layers, "input_layernorm.weight", 0)
             + common.per_layer(prefix, layers, "post_attention_layernorm.weight", 0))
    return [*common.embedding_sizes(cfg, embed="model.embed_tokens.weight", norm="model.norm.weight",
                                    lm_head="lm_head.weight", layer_norms=norms),
            *moe_sizes(cfg, prefix, moe, dense, LAYOUT.experts_field),
            *common.gqa_sizes(cfg, prefix, layers)]


def moe_sizes(cfg: ModelConfig, prefix: str, moe, dense, experts_field: str) -> list[common.SizeField]:
    """The expert count and widths of `mlp.` MoE layers (router mlp.gate [E, D], experts [F, D], shared experts)
    and dense ones (mlp.gate_proj [dense F, D]), shared by Qwen3-MoE and DeepSeek-V2."""
    fields = [
        common.SizeField(experts_field, cfg.num_experts, common.per_layer(prefix, moe, "mlp.gate.weight", 0)),
        common.SizeField("moe_intermediate_size", cfg.expert_ffn_dim,
                         common.per_layer(prefix, moe, "mlp.experts.0.gate_proj.weight", 0)),
    ]
    if dense:
        fields.append(common.SizeField("intermediate_size", cfg.dense_ffn_dim,
                                       common.per_layer(prefix, dense, "mlp.gate_proj.weight", 0)))
    if cfg.shared_ffn_dim:
        F = cfg.expert_ffn_dim
        fields.append(common.SizeField("n_shared_experts", cfg.shared_ffn_dim // F,
                                       common.per_layer(prefix, moe, "mlp.shared_experts.gate_proj.weight", 0),
                                       factor=F, how=f" (x moe_intermediate_size {F} rows of shared_experts)"))
    return fields


def tensor_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    rules = mixtral.embedding_rules(cfg)
    for layer in range(cfg.num_layers):
        prefix, path = f"model.layers.{layer}.", ("layers", layer)
        rules += [
            *common.llama_layer_norms(prefix, path, cfg.d_model),
            *common.gqa_attention(prefix + "self_attn.", path, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                                  cfg.head_dim, cfg.qk_norm),
        ]
        rules += mlp_rules(cfg, layer, prefix + "mlp.", path)
    return rules


def mlp_rules(cfg: ModelConfig, layer: int, prefix: str, path) -> list[common.TensorRule]:
    """A dense `mlp.{gate,up,down}_proj` or an MoE `mlp.gate` + `mlp.experts.{e}.*` (+ `mlp.shared_experts.*`)."""
    proj = lambda p: (f"{p}gate_proj.weight", f"{p}up_proj.weight", f"{p}down_proj.weight")
    if not cfg.is_moe_layer(layer):
        return common.gated_mlp(*proj(prefix), path + ("mlp",), cfg.d_model, cfg.dense_ffn_dim)
    rules = common.per_expert_moe(prefix, ("gate_proj", "up_proj", "down_proj"), "gate", path, cfg.num_experts,
                                  cfg.d_model, cfg.expert_ffn_dim)
    if cfg.shared_ffn_dim:
        rules += common.gated_mlp(*proj(prefix + "shared_experts."), path + ("moe", "shared"),
                                  cfg.d_model, cfg.shared_ffn_dim)
    return rules
