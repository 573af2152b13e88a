"""Quantized routed experts: FP8 W8A8 (pallas_kernels.fp8: e4m3 weights with a scale per expert and output channel,
activations quantized per token at run time). Attention, routers, shared experts and embeddings stay in the model's
dtype: the routed experts hold nearly all of an MoE's weights.

    quantize_experts(model, "fp8")                        # in place, layer by layer
    load_checkpoint(path, quantize="fp8")                 # each expert tensor quantized as it streams in
"""

from __future__ import annotations

from epsjax.models.config import ConfigError
from epsjax.pallas_kernels import fp8

EXPERT_WEIGHTS = ("w_gate_EDF", "w_up_EDF", "w_down_EFD")
SCHEMES = ("fp8",)


def check_scheme(scheme: str | None) -> None:
    if scheme is not None and scheme not in SCHEMES:
        raise ConfigError(f"quantize must be one of {SCHEMES} or None, got {scheme!r}")


def quantize_weight(value, scheme: str):
    """One stacked expert weight [E, K, N] in the scheme's format."""
    check_scheme(scheme)
    return fp8.quantize_weights(value)


def quantize_experts(model, scheme: str = "fp8"):
    """Quantizes every MoE layer's routed experts in place (one weight at a time); returns the model."""
    check_scheme(scheme)
    for layer in model.layers:
        moe = getattr(layer, "moe", None)
        if moe is None:
            continue
        for name in EXPERT_WEIGHTS:
            variable = getattr(moe, name)
            if not fp8.is_quantized(variable[...]):
                variable.set_value(quantize_weight(variable[...], scheme))
    return model


def is_quantized(model) -> bool:
    return any(fp8.is_quantized(getattr(layer.moe, name)[...]) for layer in model.layers
               if getattr(layer, "moe", None) is not None for name in EXPERT_WEIGHTS)
