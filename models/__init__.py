"""Flax NNX MoE models: configs and presets, attention (GQA, MLA), routers, the MoE block, families."""

from models.config import ConfigError, ModelConfig, MLAConfig, RopeConfig, RouterConfig, get_preset, list_presets
from models.transformer import MoETransformer, ForwardOutput
from models.moe import ExpertCompute, LocalExperts, MoEStats

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
