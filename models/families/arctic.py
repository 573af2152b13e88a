"""Snowflake Arctic: Mixtral-style layers plus a dense residual MLP (width d_model) in parallel with every MoE.

transformers has no Arctic class; names follow the Hub checkpoint (remote code `modeling_arctic.py`).
"""

from __future__ import annotations

from epsjax.models.config import ConfigError, ModelConfig
from epsjax.models.families import common, mixtral


def config_from_hf(hf: dict, *, dtype: str) -> ModelConfig:
    f = common.HFFields(hf)
    frequency = f.int("moe_layer_frequency", 1)
    if frequency != 1:
        raise ConfigError(f"field moe_layer_frequency={frequency}: Arctic is supported with 1 only (as released)")
    if not f.bool("parallel_attn_mlp_res"):
        raise ConfigError("field parallel_attn_mlp_res: Arctic is supported with true only (as released)")
    base = mixtral.config_from_hf(hf, dtype=dtype, name="arctic")
    return base.replace(family="arctic", dense_residual=True, dense_ffn_dim=f.int("hidden_size"))


def config_to_hf(cfg: ModelConfig) -> dict:
    return {**mixtral.config_to_hf(cfg), "architectures": ["ArcticForCausalLM"], "model_type": "arctic",
            "moe_layer_frequency": 1, "parallel_attn_mlp_res": True}


LAYOUT = mixtral.LAYOUT


def size_fields(cfg: ModelConfig) -> list[common.SizeField]:
    """Mixtral's (the dense residual MLP is d_model wide, hidden_size's witnesses already)."""
    return mixtral.size_fields(cfg)


def tensor_rules(cfg: ModelConfig) -> list[common.TensorRule]:
    rules = mixtral.embedding_rules(cfg)
    for layer in range(cfg.num_layers):
        prefix, path = f"model.layers.{layer}.", ("layers", layer)
        rules += mixtral.layer_rules(cfg, layer)
        rules.append(common.identity(prefix + "residual_layernorm.weight", path + ("residual_norm", "scale"),
                                     (cfg.d_model,)))
        rules += common.gated_mlp(prefix + "residual_mlp.w1.weight", prefix + "residual_mlp.w3.weight",
                                  prefix + "residual_mlp.w2.weight", path + ("residual_mlp",), cfg.d_model,
                                  cfg.dense_ffn_dim)
    return rules
