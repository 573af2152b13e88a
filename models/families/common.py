"""Pieces shared by the family mappings between Hugging Face checkpoints and our parameter tree.

A `TensorRule` ties one or more HF tensors to one or more of our parameters: `load` turns the HF arrays (in the
order of hf_names) into our arrays (in the order of paths) and `save` does the reverse. HF linear weights are
[out, in]; ours put inputs first and split heads out, e.g. q_proj [N*H, D] <-> q_DNH [D, N, H].
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from epsjax.models.config import ConfigError

Path = tuple  # e.g. ("layers", 0, "attn", "q_DNH")
_MISSING = object()


class HFFields:
    """Typed, range-checked reads of a Hugging Face config.json (a dict): every field a family reads goes through
    one of these, and a missing, mistyped or out-of-range value is a ConfigError naming the field, the value seen
    and what is allowed. `where` prefixes the field names of a nested section (e.g. DBRX's "ffn_config.")."""

    def __init__(self, hf: dict, where: str = ""):
        if not isinstance(hf, dict):
            raise ConfigError(f"{where.rstrip('.') or 'config.json'} must be a JSON object, got {type(hf).__name__}")
        self.hf, self.where = hf, where

    def _get(self, name, default):
        if name in self.hf and self.hf[name] is not None:
            return self.hf[name]
        if default is _MISSING:
            raise ConfigError(f"field {self.where}{name} is missing")
        return default

    def _fail(self, name, value, allowed):
        raise ConfigError(f"field {self.where}{name} must be {allowed}, got {value!r}")

    def has(self, name) -> bool:
        return self.hf.get(name) is not None

    def int(self, name, default=_MISSING, *, min: int = 1) -> int:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < min:
            self._fail(name, value, f"an integer >= {min}")
        return value

    def optional_int(self, name, *, min: int = 1) -> int | None:
        return self.int(name, None, min=min) if self.has(name) else None

    def float(self, name, default=_MISSING, *, positive: bool = True) -> float:
        value = self._get(name, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            self._fail(name, value, "a finite number" + (" > 0" if positive else ""))
        return float(value)

    def bool(self, name, default: bool = False) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self._fail(name, value, "true or false")
        return value

    def str(self, name, default=_MISSING, *, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(name, default)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            self._fail(name, value, f"one of {', '.join(choices)}" if choices else "a string")
        return value

    def int_list(self, name) -> list[int]:
        value = self._get(name, [])
        if not isinstance(value, list) or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            self._fail(name, value, "a list of integers >= 0")
        return value

    def token_id(self, name) -> int | None:
        """A special token id: an integer >= 0, the first of a list of them (HF allows several EOS), or absent."""
        value = self.hf.get(name)
        if isinstance(value, list):
            if not value:
                return None
            value = value[0]
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            self._fail(name, self.hf.get(name), "a token id (an integer >= 0, or a list of them)")
        return value

    def section(self, name) -> "HFFields":
        return HFFields(self._get(name, {}), where=f"{self.where}{name}.")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a family's checkpoint shows its counts, for checking config.json against the tensor names alone:
    layer l's tensors are named layer_prefix + f"{l}." (the count is config.json's `layers_field`); per-expert
    tensors hold ".experts.{e}." in their names (`experts_field`; DBRX fuses its experts and has none); a layer
    with routed experts has tensors holding ".experts." or named `router`; `dense_field` names the config.json
    fields that make layers dense (None: every layer is an MoE layer)."""

    layer_prefix: str
    layers_field: str
    experts_field: str
    router: str
    dense_field: str | None = None


@dataclasses.dataclass(frozen=True)
class SizeField:
    """A size config.json declares, as the checkpoint's tensors show it: `field` (named as config.json names it)
    declares `value`, so dimension d of each tensor (name, d) in `where` must hold value * factor + offset; `how`
    spells a product or sum, e.g. " x head_dim 16" for the rows of q_proj (heads x head_dim)."""

    field: str
    value: int
    where: tuple[tuple[str, int], ...]
    factor: int = 1
    offset: int = 0
    how: str = ""

    @property
    def expected(self) -> int:
        return self.value * self.factor + self.offset

    def held(self, extent: int) -> int | None:
        """The value of the field that a dimension of `extent` means (None when no integer does)."""
        rest = extent - self.offset
        return rest // self.factor if rest > 0 and rest % self.factor == 0 else None


def per_layer(prefix: str, layers, suffix: str, dim: int) -> tuple[tuple[str, int], ...]:
    """(name, dim) of one tensor in each of `layers`: prefix + f"{layer}." + suffix."""
    return tuple((f"{prefix}{layer}.{suffix}", dim) for layer in layers)


def embedding_sizes(cfg, *, embed: str, norm: str, lm_head: str, layer_norms, vocab_field: str = "vocab_size",
                    d_model_field: str = "hidden_size") -> list[SizeField]:
    """vocab_size and the model width, from the embedding [V, D], the final norm [D], lm_head [V, D] and the layers'
    norms [D] (`layer_norms`: (name, 0) pairs)."""
    head = () if cfg.tie_embeddings else ((lm_head, 0),)
    head_d = () if cfg.tie_embeddings else ((lm_head, 1),)
    return [SizeField(vocab_field, cfg.vocab_size, ((embed, 0), *head)),
            SizeField(d_model_field, cfg.d_model, ((embed, 1), (norm, 0), *head_d, *layer_norms))]


def gqa_sizes(cfg, prefix: str, layers) -> list[SizeField]:
    """head_dim (from q_norm / k_norm when there are), heads and KV heads (q_proj [N*H, D], k_proj, v_proj [K*H, D],
    o_proj [D, N*H]) of Llama-style attention under prefix + f"{layer}.self_attn."."""
    H, each = cfg.head_dim, lambda suffix, dim: per_layer(prefix, layers, f"self_attn.{suffix}", dim)
    fields = []
    if cfg.qk_norm:
        fields.append(SizeField("head_dim", H, each("q_norm.weight", 0) + each("k_norm.weight", 0)))
    return fields + [
        SizeField("num_attention_heads", cfg.num_heads, each("q_proj.weight", 0) + each("o_proj.weight", 1),
                  factor=H, how=f" (x head_dim {H} rows of q_proj)"),
        SizeField("num_key_value_heads", cfg.num_kv_heads, each("k_proj.weight", 0) + each("v_proj.weight", 0),
                  factor=H, how=f" (x head_dim {H} rows of k_proj and v_proj)"),
    ]


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_names: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    paths: tuple[Path, ...]
    load: Callable[[list[np.ndarray]], list[np.ndarray]]
    save: Callable[[list[np.ndarray]], list[np.ndarray]]


def identity(hf_name: str, path: Path, shape: tuple[int, ...]) -> TensorRule:
    return TensorRule((hf_name,), (tuple(shape),), (path,), load=lambda a: [a[0]], save=lambda a: [a[0]])


def linear(hf_name: str, path: Path, shape: tuple[int, ...], n_in: int = 1) -> TensorRule:
    """Our weight has its n_in input dims first: shape = (*in, *out); HF stores [prod(out), prod(in)]."""
    n_inputs, n_outputs = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    return TensorRule(
        (hf_name,), ((n_outputs, n_inputs),), (path,),
        load=lambda a: [np.ascontiguousarray(a[0].T).reshape(shape)],
        save=lambda a: [np.ascontiguousarray(a[0].reshape(n_inputs, n_outputs).T)])


def stacked_experts(hf_names: list[str], path: Path, shape: tuple[int, int, int]) -> TensorRule:
    """E per-expert HF linears [out, in] <-> our stacked [E, in, out]."""
    E, n_in, n_out = shape
    return TensorRule(
        tuple(hf_names), ((n_out, n_in),) * E, (path,),
        load=lambda a: [np.stack([w.T for w in a])],
        save=lambda a: [np.ascontiguousarray(w.T) for w in a[0]])


def llama_layer_norms(prefix: str, layer_path: Path, d_model: int) -> list[TensorRule]:
    """The two per-layer norms of Llama-style layers (Mixtral, Arctic, DeepSeek-V2, Qwen3-MoE)."""
    return [identity(prefix + "input_layernorm.weight", layer_path + ("attn_norm", "scale"), (d_model,)),
            identity(prefix + "post_attention_layernorm.weight", layer_path + ("ffn_norm", "scale"), (d_model,))]


def gqa_attention(prefix: str, layer_path: Path, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int,
                  qk_norm: bool) -> list[TensorRule]:
    """Llama-style q/k/v/o_proj (+ Qwen3 q_norm/k_norm) under `prefix` (e.g. "model.layers.3.self_attn.")."""
    attn = layer_path + ("attn",)
    rules = [
        linear(prefix + "q_proj.weight", attn + ("q_DNH",), (d_model, num_heads, head_dim)),
        linear(prefix + "k_proj.weight", attn + ("k_DKH",), (d_model, num_kv_heads, head_dim)),
        linear(prefix + "v_proj.weight", attn + ("v_DKH",), (d_model, num_kv_heads, head_dim)),
        linear(prefix + "o_proj.weight", attn + ("o_NHD",), (num_heads, head_dim, d_model), n_in=2),
    ]
    if qk_norm:
        rules += [identity(prefix + "q_norm.weight", attn + ("q_norm", "scale"), (head_dim,)),
                  identity(prefix + "k_norm.weight", attn + ("k_norm", "scale"), (head_dim,))]
    return rules


def gated_mlp(gate: str, up: str, down: str, path: Path, d_model: int, ffn_dim: int) -> list[TensorRule]:
    return [linear(gate, path + ("gate_DF",), (d_model, ffn_dim)),
            linear(up, path + ("up_DF",), (d_model, ffn_dim)),
            linear(down, path + ("down_FD",), (ffn_dim, d_model))]


def per_expert_moe(prefix: str, names: tuple[str, str, str], router_name: str, layer_path: Path, num_experts: int,
                   d_model: int, ffn_dim: int) -> list[TensorRule]:
    """Router + per-expert gate/up/down tensors named prefix + "experts.{e}." + names[i] + ".weight"."""
    moe = layer_path + ("moe",)
    expert = lambda kind: [f"{prefix}experts.{e}.{kind}.weight" for e in range(num_experts)]
    gate, up, down = names
    return [
        linear(prefix + router_name + ".weight", moe + ("router", "kernel_DE"), (d_model, num_experts)),
        stacked_experts(expert(gate), moe + ("w_gate_EDF",), (num_experts, d_model, ffn_dim)),
        stacked_experts(expert(up), moe + ("w_up_EDF",), (num_experts, d_model, ffn_dim)),
        stacked_experts(expert(down), moe + ("w_down_EFD",), (num_experts, ffn_dim, d_model)),
    ]


def rope_from_hf(hf: HFFields) -> dict:
    """RopeConfig fields from an HF config: transformers 5 `rope_parameters`, or the Hub's `rope_theta` and
    `rope_scaling` (transformers 4 layout)."""
    section = "rope_parameters" if hf.has("rope_parameters") else "rope_scaling"
    params = hf.section(section)
    kind = params.str("rope_type", params.str("type", "default"))
    theta = params.float("rope_theta", hf.float("rope_theta", 10_000.0))
    fields = {"theta": theta}
    if kind == "yarn":
        mscale = params.float("mscale") if params.has("mscale") else None
        mscale_all_dim = params.float("mscale_all_dim") if params.has("mscale_all_dim") else None
        fields.update(
            yarn_factor=params.float("factor"),
            yarn_original_max_position=params.int("original_max_position_embeddings"),
            yarn_beta_fast=params.float("beta_fast", 32.0), yarn_beta_slow=params.float("beta_slow", 1.0),
            yarn_mscale=mscale, yarn_mscale_all_dim=mscale_all_dim)
        if params.has("attention_factor"):
            raise ConfigError(f"field {section}.attention_factor: an explicit YaRN attention_factor is not supported")
    elif kind != "default":
        raise ConfigError(f"field {section}.rope_type must be one of default, yarn (supported), got {kind!r}")
    return fields


def rope_to_hf(rope) -> dict:
    params = {"rope_type": "default", "rope_theta": rope.theta}
    if rope.yarn_factor is not None:
        params.update(rope_type="yarn", factor=rope.yarn_factor,
                      original_max_position_embeddings=rope.yarn_original_max_position,
                      beta_fast=rope.yarn_beta_fast, beta_slow=rope.yarn_beta_slow, mscale=rope.yarn_mscale,
                      mscale_all_dim=rope.yarn_mscale_all_dim)
    return {"rope_parameters": params}


def hf_dtype_name(dtype: str) -> str:
    return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}[dtype]
