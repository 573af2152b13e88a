"""Mixtral (and the Llama-style skeleton Arctic shares): HF config and tensor names."""

from __future__ import annotations

from epsjax.models.config import ConfigError, ModelConfig, RopeConfig, RouterConfig
from epsjax.models.families import common


def config_from_hf(hf: dict, *, dtype: str, name: str = "mixtral") -> ModelConfig:
    f = common.HFFields(hf)
    if f.has("sliding_window"):
        raise ConfigError(f"field sliding_window={hf['sliding_window']!r}: sliding-window attention is not supported "
                          "(only null)")
    heads, d_model = f.int("num_attention_heads"), f.int("hidden_size")
    return ModelConfig(
        name=name, family="mixtral", vocab_size=f.int("vocab_size"), d_model=d_model,
        num_layers=f.int("num_hidden_layers"), num_heads=heads, num_kv_heads=f.int("num_key_value_heads", heads),
        head_dim=f.int("head_dim", d_model // heads), num_experts=f.int("num_local_experts"),
        expert_ffn_dim=f.int("intermediate_size"), router=RouterConfig(top_k=f.int("num_experts_per_tok")),
        rope=RopeConfig(**common.rope_from_hf(f)), norm_eps=f.float("rms_norm_eps", 1e-5),
        max_seq_len=f.int("max_position_embeddings", 4096), tie_embeddings=f.bool("tie_word_embeddings"),
        pad_token_id=f.token_id("pad_token_id") or 0, eos_token_id=f.token_id("eos_token_id"), dtype=dtype)


def config_to_hf(cfg: ModelConfig) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.expert_ffn_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.router.top_k, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "sliding_window": None,
        "torch_dtype": common.hf_dtype_name(cfg.dtype), **common.rope_to_hf(cfg.rope)}


LAYOUT = common.Layout(layer_prefix="model.layers.", layers_field="num_hidden_layers",
                       experts_field="num_local_experts", router="block_sparse_moe.gate.weight")


def size_fields(cfg: ModelConfig) -> list[common.SizeField]:
    """config.json's sizes as the tensors show them (epsjax.checkpoint_sizes checks them from the headers)."""
    layers, prefix = range(cfg.num_layers), LAYOUT.layer_prefix
    norms = (common.per_layer(prefix, layers, "input_layernorm.weight", 0)
             + common.per_layer(prefix, layers, "post_attention_layernorm.weight", 0))
    moe = lambda suffix: common.per_layer(prefix, layers, f"block_sparse_moe.{suffix}", 0)  # noqa: E731
    return [*common.embedding_sizes(cfg, embed="model.embed_tokens.weight", norm="model.norm.weight",
                                    lm_head="lm_head.weight", layer_norms=norms),
            common.SizeField(LAYOUT.experts_field, cfg.num_experts, moe("gate.weight")),
            common.SizeField("intermediate_size", cfg.expert_ffn_dim, moe("experts.0.w1.weight")),
            *common.gqa_sizes(cfg, prefix, layers)]


def embedding_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    rules = [common.identity("model.embed_tokens.weight", ("embed", "embedding"), (cfg.vocab_size, cfg.d_model)),
             common.identity("model.norm.weight", ("final_norm", "scale"), (cfg.d_model,))]
    if not cfg.tie_embeddings:
        rules.append(common.linear("lm_head.weight", ("lm_head_DV",), (cfg.d_model, cfg.vocab_size)))
    return rules


def layer_rules(cfg: ModelConfig, layer: int) -> list[common.TensorRule]:
    """Attention, norms and the block_sparse_moe of one Llama-style layer."""
    prefix, path = f"model.layers.{layer}.", ("layers", layer)
    return [
        *common.llama_layer_norms(prefix, path, cfg.d_model),
        *common.gqa_attention(prefix + "self_attn.", path, cfg.d_model, cfg.num_heads, cfg.num_kv_heads,
                              cfg.head_dim, cfg.qk_norm),
        *common.per_expert_moe(prefix + "block_sparse_moe.", ("w1", "w3", "w2"), "gate", path, cfg.num_experts,
                               cfg.d_model, cfg.expert_ffn_dim),
    ]


def tensor_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    return embedding_rules(cfg) + [r for layer in range(cfg.num_layers) for r in layer_rules(cfg, layer)]
