"""A DeepSeek-V2-Lite-sized model (real dims, random bf16 weights) builds and prefills on the CPU.

All 27 layers hold 15.7B parameters (31 GiB in bf16), more than a 24 GiB CI machine has, so this builds the first
three layers at real size (one dense, two MoE: 64 experts x 1408, 2 shared, MLA with kv_lora 512) plus the real
102400-token embedding and head.
"""

import resource

import numpy as np
import pytest
from flax import nnx

from epsjax.engine import Engine
from epsjax.models import MoETransformer, get_preset


@pytest.mark.slow
def test_deepseek_v2_lite_layers_prefill_in_bf16():
    cfg = get_preset("deepseek-v2-lite", num_layers=3, max_seq_len=256)
    assert cfg.dtype == "bfloat16" and cfg.d_model == 2048 and cfg.num_experts == 64
    engine = Engine(MoETransformer(cfg, rngs=nnx.Rngs(0)))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 64))
    logits, state, stats = engine.prefill(tokens, cache_len=128)
    assert logits.shape == (2, cfg.vocab_size) and np.isfinite(np.asarray(logits)).all()
    assert state.cache[0]["latent"].shape == (2, 128, 512)  # MLA caches the 512-wide latent, not per-head keys
    assert int(np.asarray(stats.tokens_per_expert).sum()) == 2 * 64 * 6 * 2  # B*T*top_k per MoE layer, 2 layers
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak_gib < 20, f"peak RSS {peak_gib:.1f} GiB"
