"""Flax NNX MoE models: configs and presets, attention (GQA, MLA), routers, the MoE block, families."""

from epsjax.models.config import ConfigError, ModelConfig, MLAConfig, RopeConfig, RouterConfig, get_preset, list_presets
from epsjax.models.transformer import MoETransformer, ForwardOutput
from epsjax.models.moe import ExpertCompute, LocalExperts, MoEStats

__all__ = [
    "ConfigError",
    "ExpertCompute",
    "ForwardOutput",
    "LocalExperts",
    "MLAConfig",
    "MoEStats",
    "MoETransformer",
    "ModelConfig",
    "RopeConfig",
    "RouterConfig",
    "get_preset",
    "list_presets",
]
