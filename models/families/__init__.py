"""Per-family mappings between Hugging Face checkpoints (config.json + tensor names) and our configs/parameters.

Keyed by config.json's `model_type`. Each module provides config_from_hf, config_to_hf and tensor_rules.
"""

from epsjax.models.config import ConfigError
from epsjax.models.families import arctic, dbrx, deepseek_v2, mixtral, qwen3_moe

FAMILIES = {"mixtral": mixtral, "deepseek_v2": deepseek_v2, "qwen3_moe": qwen3_moe, "dbrx": dbrx, "arctic": arctic}


def family_module(model_type: str):
    if model_type not in FAMILIES:
        raise ConfigError(f"field model_type={model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]
