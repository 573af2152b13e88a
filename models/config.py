"""Model configs: frozen, typed, hashable (usable as static jit arguments), with presets.

A model family differs from another only by these fields; layers never branch on a model's name.
Presets carry the published sizes of each model; `tiny-*` presets are for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax.numpy as jnp

from epsjax.errors import EpsjaxError

FLOAT_DTYPES = ("bfloat16", "float16", "float32")


class ConfigError(EpsjaxError):
    """A model configuration that cannot describe a model: the message names the field, the value and what is
    allowed (and the config.json when it came from one)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding.

    layout: "rotate_half" pairs dimension i with i + H/2 (Mixtral, Qwen3, DBRX, Arctic);
            "interleaved" pairs 2i with 2i + 1 (DeepSeek-V2's complex-number form).
    yarn_*: YaRN frequency interpolation as in DeepSeek-V2 (None = plain RoPE).
    """

    theta: float = 10_000.0
    layout: Literal["rotate_half", "interleaved"] = "rotate_half"
    yarn_factor: float | None = None
    yarn_original_max_position: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float | None = None
    yarn_mscale_all_dim: float | None = None

    def __post_init__(self):
        if self.layout not in ("rotate_half", "interleaved"):
            raise ConfigError(f"rope layout must be 'rotate_half' or 'interleaved', got {self.layout!r}")
        if not _finite_positive(self.theta):
            raise ConfigError(f"rope theta must be a finite number > 0, got {self.theta!r}")
        if self.yarn_factor is not None:
            if not _finite_positive(self.yarn_factor):
                raise ConfigError(f"rope YaRN factor must be a finite number > 0, got {self.yarn_factor!r}")
            if not isinstance(self.yarn_original_max_position, int) or self.yarn_original_max_position < 1:
                raise ConfigError(f"rope YaRN original_max_position_embeddings must be a positive integer, got "
                                  f"{self.yarn_original_max_position!r}")
            for name in ("yarn_beta_fast", "yarn_beta_slow"):
                if not _finite_positive(getattr(self, name)):
                    raise ConfigError(f"rope {name} must be a finite number > 0, got {getattr(self, name)!r}")

    @property
    def attention_factor(self) -> float:
        """YaRN's scale on cos/sin (1.0 without YaRN), as transformers computes it."""
        if self.yarn_factor is None:
            return 1.0
        if self.yarn_mscale and self.yarn_mscale_all_dim:
            return _yarn_mscale(self.yarn_factor, self.yarn_mscale) / _yarn_mscale(self.yarn_factor,
                                                                                  self.yarn_mscale_all_dim)
        return _yarn_mscale(self.yarn_factor)

    @property
    def softmax_scale_factor(self) -> float:
        """DeepSeek's YaRN multiplies the attention softmax scale by mscale(factor, mscale_all_dim)^2."""
        if self.yarn_factor is None or not self.yarn_mscale_all_dim:
            return 1.0
        return _yarn_mscale(self.yarn_factor, self.yarn_mscale_all_dim) ** 2


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V2 multi-head latent attention. q_lora_rank=None projects queries directly (V2-Lite)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    """Top-k routing over softmax probabilities.

    topk_norm_p: None keeps the softmax probabilities of the chosen experts; p renormalises them by their p-norm
                 (p=1: Mixtral, Qwen3 norm_topk_prob, Arctic; DBRX's moe_normalize_expert_weights).
    n_group/topk_group: DeepSeek's group-limited greedy routing (experts split into n_group groups, a token may
                 only pick experts from its topk_group best groups, a group scored by its best expert).
    routed_scaling_factor: multiplies the final routing weights (DeepSeek-V2).
    """

    top_k: int
    topk_norm_p: float | None = 1.0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only MoE transformer.

    Layer l has a dense FFN (width dense_ffn_dim) if l is in dense_layers, else an MoE FFN (num_experts experts
    of width expert_ffn_dim, top-k routing, plus shared experts of total width shared_ffn_dim if > 0).
    dense_residual adds Arctic's dense MLP (width dense_ffn_dim; Arctic uses d_model) beside every MoE.
    """

    name: str
    family: Literal["mixtral", "deepseek_v2", "qwen3_moe", "dbrx", "arctic"]
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    expert_ffn_dim: int
    router: RouterConfig
    dense_ffn_dim: int = 0
    shared_ffn_dim: int = 0
    dense_layers: tuple[int, ...] = ()
    dense_residual: bool = False
    mla: MLAConfig | None = None
    rope: RopeConfig = RopeConfig()
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    qk_norm: bool = False
    clip_qkv: float | None = None
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    pad_token_id: int = 0
    eos_token_id: int | None = None
    dtype: str = "bfloat16"

    def __post_init__(self):
        def fail(message: str):
            raise ConfigError(f"ModelConfig {self.name!r}: {message}")

        def positive(**fields):
            for key, value in fields.items():
                if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                    fail(f"{key} must be a positive integer, got {value!r}")

        positive(vocab_size=self.vocab_size, d_model=self.d_model, num_layers=self.num_layers,
                 num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                 num_experts=self.num_experts, expert_ffn_dim=self.expert_ffn_dim, max_seq_len=self.max_seq_len)
        for key in ("dense_ffn_dim", "shared_ffn_dim"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(f"{key} must be an integer >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            fail(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        r = self.router
        positive(**{"router.top_k": r.top_k, "router.n_group": r.n_group, "router.topk_group": r.topk_group})
        if r.top_k > self.num_experts:
            fail(f"router.top_k={r.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.num_experts % r.n_group:
            fail(f"num_experts={self.num_experts} is not divisible by router.n_group={r.n_group}")
        if r.topk_group > r.n_group:
            fail(f"router.topk_group={r.topk_group} must be in [1, n_group={r.n_group}]")
        if r.n_group > 1 and r.top_k > r.topk_group * (self.num_experts // r.n_group):
            fail(f"router.top_k={r.top_k} exceeds the {r.topk_group} groups x {self.num_experts // r.n_group} experts "
                 f"a token may choose from")
        if r.topk_norm_p is not None and not _finite_positive(r.topk_norm_p):
            fail(f"router.topk_norm_p must be a finite number > 0 or None, got {r.topk_norm_p!r}")
        if not _finite_positive(r.routed_scaling_factor):
            fail(f"router.routed_scaling_factor must be a finite number > 0, got {r.routed_scaling_factor!r}")
        bad_layers = [l for l in self.dense_layers if not 0 <= l < self.num_layers]
        if bad_layers:
            fail(f"dense_layers {bad_layers} outside [0, {self.num_layers})")
        if len(self.dense_layers) == self.num_layers:
            fail(f"every one of the {self.num_layers} layers is dense: an MoE model needs at least one MoE layer")
        if (self.dense_layers or self.dense_residual) and self.dense_ffn_dim <= 0:
            fail("dense layers or a dense residual need dense_ffn_dim > 0")
        if self.mla is not None:
            m = self.mla
            positive(**{"mla.kv_lora_rank": m.kv_lora_rank, "mla.qk_nope_head_dim": m.qk_nope_head_dim,
                        "mla.qk_rope_head_dim": m.qk_rope_head_dim, "mla.v_head_dim": m.v_head_dim})
            if m.q_lora_rank is not None:
                positive(**{"mla.q_lora_rank": m.q_lora_rank})
            if m.qk_rope_head_dim % 2:
                fail(f"mla.qk_rope_head_dim={m.qk_rope_head_dim} must be even (rotary pairs)")
        elif self.head_dim % 2:
            fail(f"head_dim={self.head_dim} must be even (rotary pairs)")
        if self.norm not in ("rms", "layer"):
            fail(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if not _finite_positive(self.norm_eps):
            fail(f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        if self.clip_qkv is not None and not _finite_positive(self.clip_qkv):
            fail(f"clip_qkv must be a finite number > 0 or None, got {self.clip_qkv!r}")
        for key in ("pad_token_id", "eos_token_id"):
            value = getattr(self, key)
            if value is None and key == "eos_token_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                fail(f"{key}={value!r} is not a token id of the vocabulary [0, {self.vocab_size})")
        if self.dtype not in FLOAT_DTYPES:
            fail(f"dtype {self.dtype!r} (the parameters' dtype) must be one of {', '.join(FLOAT_DTYPES)}")

    # Derived sizes ------------------------------------------------------------------------------------------------

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(l for l in range(self.num_layers) if self.is_moe_layer(l))

    @property
    def expert_params_per_layer(self) -> int:
        return self.num_experts * 3 * self.d_model * self.expert_ffn_dim

    def param_counts(self) -> dict[str, int]:
        """Parameter counts by kind: what `epsjax info` reports and memory planning uses."""
        D = self.d_model
        if self.mla is None:
            attn = D * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
            attn += 2 * self.head_dim if self.qk_norm else 0
        else:
            m = self.mla
            q = D * self.num_heads * m.qk_head_dim if m.q_lora_rank is None else (
                D * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * self.num_heads * m.qk_head_dim)
            kv = D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
            kv += m.kv_lora_rank * self.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
            attn = q + kv + self.num_heads * m.v_head_dim * D
        dense_mlp = 3 * D * self.dense_ffn_dim
        n_moe = self.num_layers - len(set(self.dense_layers))  # not len(moe_layers): no list of num_layers
        n_dense = self.num_layers - n_moe
        counts = {
            "embedding": self.vocab_size * D * (1 if self.tie_embeddings else 2),
            "attention": self.num_layers * (attn + 2 * D),
            "dense_ffn": n_dense * dense_mlp + (n_moe * dense_mlp if self.dense_residual else 0),
            "router": n_moe * D * self.num_experts,
            "shared_experts": n_moe * 3 * D * self.shared_ffn_dim,
            "routed_experts": n_moe * self.expert_params_per_layer,
        }
        counts["total"] = sum(counts.values()) + D
        counts["active_per_token"] = counts["total"] - counts["routed_experts"] + (
            n_moe * self.router.top_k * 3 * D * self.expert_ffn_dim)
        return counts

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# Presets -------------------------------------------------------------------------------------------------------------

_DEEPSEEK_YARN = RopeConfig(theta=10_000.0, layout="interleaved", yarn_factor=40.0, yarn_original_max_position=4096,
                            yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=0.707, yarn_mscale_all_dim=0.707)


def _presets() -> dict[str, ModelConfig]:
    p = {}
    # Published sizes (the models' Hugging Face config.json files).
    p["deepseek-v2"] = ModelConfig(
        name="deepseek-v2", family="deepseek_v2", vocab_size=102400, d_model=5120, num_layers=60, num_heads=128,
        num_kv_heads=128, head_dim=192, num_experts=160, expert_ffn_dim=1536, dense_ffn_dim=12288,
        shared_ffn_dim=2 * 1536, dense_layers=(0,),
        router=RouterConfig(top_k=6, topk_norm_p=None, n_group=8, topk_group=3, routed_scaling_factor=16.0),
        mla=MLAConfig(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        rope=_DEEPSEEK_YARN, norm_eps=1e-6, max_seq_len=163840, eos_token_id=100001, pad_token_id=100001)
    p["deepseek-v2-lite"] = ModelConfig(
        name="deepseek-v2-lite", family="deepseek_v2", vocab_size=102400, d_model=2048, num_layers=27, num_heads=16,
        num_kv_heads=16, head_dim=192, num_experts=64, expert_ffn_dim=1408, dense_ffn_dim=10944,
        shared_ffn_dim=2 * 1408, dense_layers=(0,), router=RouterConfig(top_k=6, topk_norm_p=None),
        mla=MLAConfig(q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        rope=_DEEPSEEK_YARN, norm_eps=1e-6, max_seq_len=163840, eos_token_id=100001, pad_token_id=100001)
    p["mixtral-8x7b"] = ModelConfig(
        name="mixtral-8x7b", family="mixtral", vocab_size=32000, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, num_experts=8, expert_ffn_dim=14336, router=RouterConfig(top_k=2),
        rope=RopeConfig(theta=1e6), norm_eps=1e-5, max_seq_len=32768, eos_token_id=2)
    p["mixtral-8x22b"] = ModelConfig(
        name="mixtral-8x22b", family="mixtral", vocab_size=32768, d_model=6144, num_layers=56, num_heads=48,
        num_kv_heads=8, head_dim=128, num_experts=8, expert_ffn_dim=16384, router=RouterConfig(top_k=2),
        rope=RopeConfig(theta=1e6), norm_eps=1e-5, max_seq_len=65536, eos_token_id=2)
    p["dbrx"] = ModelConfig(
        name="dbrx", family="dbrx", vocab_size=100352, d_model=6144, num_layers=40, num_heads=48, num_kv_heads=8,
        head_dim=128, num_experts=16, expert_ffn_dim=10752, router=RouterConfig(top_k=4, topk_norm_p=1.0),
        rope=RopeConfig(theta=500_000.0), norm="layer", norm_eps=1e-5, clip_qkv=8.0, max_seq_len=32768,
        eos_token_id=100257, pad_token_id=100277)
    p["arctic"] = ModelConfig(
        name="arctic", family="arctic", vocab_size=32000, d_model=7168, num_layers=35, num_heads=56, num_kv_heads=8,
        head_dim=128, num_experts=128, expert_ffn_dim=4864, dense_ffn_dim=7168, dense_residual=True,
        router=RouterConfig(top_k=2), rope=RopeConfig(theta=1e6), norm_eps=1e-5, max_seq_len=4096, eos_token_id=2)
    p["qwen3-30b-a3b"] = ModelConfig(
        name="qwen3-30b-a3b", family="qwen3_moe", vocab_size=151936, d_model=2048, num_layers=48, num_heads=32,
        num_kv_heads=4, head_dim=128, num_experts=128, expert_ffn_dim=768, router=RouterConfig(top_k=8),
        rope=RopeConfig(theta=1e6), qk_norm=True, norm_eps=1e-6, max_seq_len=40960, eos_token_id=151645,
        pad_token_id=151643)
    p["qwen3-235b-a22b"] = ModelConfig(
        name="qwen3-235b-a22b", family="qwen3_moe", vocab_size=151936, d_model=4096, num_layers=94, num_heads=64,
        num_kv_heads=4, head_dim=128, num_experts=128, expert_ffn_dim=1536, router=RouterConfig(top_k=8),
        rope=RopeConfig(theta=1e6), qk_norm=True, norm_eps=1e-6, max_seq_len=40960, eos_token_id=151645,
        pad_token_id=151643)

    # Tiny versions of each family for tests and the demo: same structure, toy sizes, float32.
    tiny = dict(vocab_size=256, d_model=64, num_layers=3, max_seq_len=256, dtype="float32", eos_token_id=None)
    p["tiny-deepseek-v2"] = p["deepseek-v2"].replace(
        name="tiny-deepseek-v2", num_heads=4, num_kv_heads=4, head_dim=24, num_experts=16, expert_ffn_dim=32,
        dense_ffn_dim=96, shared_ffn_dim=64, pad_token_id=0,
        router=RouterConfig(top_k=4, topk_norm_p=None, n_group=4, topk_group=2, routed_scaling_factor=2.0),
        mla=MLAConfig(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        rope=dataclasses.replace(_DEEPSEEK_YARN, yarn_original_max_position=64), **tiny)
    p["tiny-mixtral"] = p["mixtral-8x7b"].replace(
        name="tiny-mixtral", num_heads=4, num_kv_heads=2, head_dim=16, expert_ffn_dim=96, **tiny)
    p["tiny-dbrx"] = p["dbrx"].replace(
        name="tiny-dbrx", num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8, expert_ffn_dim=64, clip_qkv=1.0,
        pad_token_id=0, **tiny)
    p["tiny-arctic"] = p["arctic"].replace(
        name="tiny-arctic", num_heads=4, num_kv_heads=2, head_dim=16, num_experts=8, expert_ffn_dim=48,
        dense_ffn_dim=64, **tiny)
    p["tiny-qwen3-moe"] = p["qwen3-30b-a3b"].replace(
        name="tiny-qwen3-moe", num_heads=4, num_kv_heads=2, head_dim=32, num_experts=16, expert_ffn_dim=32,
        dense_ffn_dim=96, dense_layers=(0,), pad_token_id=0, **tiny)
    return p


PRESETS: dict[str, ModelConfig] = _presets()


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (e.g. dtype="float32", num_layers=2)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
