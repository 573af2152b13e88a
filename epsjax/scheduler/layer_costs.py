"""What one transformer layer's operations cost on one device, from a ModelConfig and a CostModel.

Shapes follow models/: attention is GQA (q, k, v, o projections) or DeepSeek's MLA (q LoRA, compressed kv,
kv_b expansion, o), both with causal prefill; the MoE FFN is router -> sort -> experts -> unsort/combine, with
shared experts (DeepSeek) or Arctic's dense residual MLP beside it. `tp` is the tensor-parallel degree the
weights are split over (heads, FFN width); parts that the rules tables replicate (MLA's q_a / kv_a, the router)
are computed whole on every device.
"""

from __future__ import annotations

from epsjax.models.config import ModelConfig

from epsjax.scheduler.costs import CostModel


def context_sum(tokens: float, seq_len: int, context: int) -> float:
    """Sum over `tokens` new tokens of the keys each attends to (causal, after `context` cached tokens)."""
    return tokens * (context + (seq_len + 1) / 2)


def attention_projections(cfg: ModelConfig, tokens: int, tp: int) -> list[tuple[int, int, int]]:
    """(rows, K, N) of each projection GEMM one device runs for `tokens` tokens under `tp`-way head split."""
    D, Nh = cfg.d_model, cfg.num_heads // tp
    if cfg.mla is None:
        kv_tp = tp if cfg.num_kv_heads % tp == 0 else 1  # GQA with fewer KV heads than ranks: replicated
        return [(tokens, D, Nh * cfg.head_dim), (tokens, D, 2 * cfg.num_kv_heads // kv_tp * cfg.head_dim),
                (tokens, Nh * cfg.head_dim, D)]
    m = cfg.mla
    q = ([(tokens, D, Nh * m.qk_head_dim)] if m.q_lora_rank is None else
         [(tokens, D, m.q_lora_rank), (tokens, m.q_lora_rank, Nh * m.qk_head_dim)])
    return q + [(tokens, D, m.kv_lora_rank + m.qk_rope_head_dim),
                (tokens, m.kv_lora_rank, Nh * (m.qk_nope_head_dim + m.v_head_dim)),
                (tokens, Nh * m.v_head_dim, D)]


def attention_core_flops(cfg: ModelConfig, tokens: int, seq_len: int, context: int, tp: int) -> float:
    """QK^T and PV flops of causal prefill for `tokens` new tokens on one device (heads / tp)."""
    Nh = cfg.num_heads // tp
    qk, v = (cfg.head_dim, cfg.head_dim) if cfg.mla is None else (cfg.mla.qk_head_dim, cfg.mla.v_head_dim)
    return 2.0 * Nh * (qk + v) * context_sum(tokens, seq_len, context)


def attention_time(costs: CostModel, cfg: ModelConfig, tokens: int, seq_len: int, context: int = 0,
                   tp: int = 1) -> float:
    """Prefill attention of one layer on one device: norm + projections + FlashAttention core + residual."""
    if tokens <= 0:
        return 0.0
    t = sum(costs.dense_gemm(r, k, n) for r, k, n in attention_projections(cfg, tokens, tp))
    t += costs.attention_core(attention_core_flops(cfg, tokens, seq_len, context, tp))
    return t + layer_misc_time(costs, cfg, tokens)


def layer_misc_time(costs: CostModel, cfg: ModelConfig, tokens: int) -> float:
    """Norms, rotary embedding and residual adds: assumed ~8 reads/writes of the [T, D] hidden state."""
    return costs.memory_pass(8.0 * tokens * cfg.d_model * costs.itemsize)


def router_time(costs: CostModel, cfg: ModelConfig, tokens: int, *, sm_for_comm: int = 0) -> float:
    """Router logits [T, D] x [D, E] plus softmax / top-k over [T, E] float32."""
    if tokens <= 0:
        return 0.0
    return (costs.dense_gemm(tokens, cfg.d_model, cfg.num_experts, sm_for_comm=sm_for_comm)
            + costs.memory_pass(3.0 * tokens * cfg.num_experts * 4, sm_for_comm=sm_for_comm))


def permute_time(costs: CostModel, cfg: ModelConfig, tokens: float, *, sm_for_comm: int = 0) -> float:
    """Sort by destination and gather the T*K rows: read and write [T*K, D]."""
    rows = tokens * cfg.router.top_k
    return costs.memory_pass(2.0 * rows * cfg.d_model * costs.itemsize, sm_for_comm=sm_for_comm)


def unpermute_time(costs: CostModel, cfg: ModelConfig, tokens: float, *, sm_for_comm: int = 0) -> float:
    """Scatter the T*K expert outputs back and sum them weighted by the router into [T, D] float32."""
    rows = tokens * cfg.router.top_k
    return costs.memory_pass(rows * cfg.d_model * costs.itemsize * 2 + tokens * cfg.d_model * 4,
                             sm_for_comm=sm_for_comm)


def dense_ffn_time(costs: CostModel, tokens: int, d: int, f: int, tp: int = 1, *, sm_for_comm: int = 0) -> float:
    """A gated MLP (gate/up fused [D, 2F/tp], down [F/tp, D]) on `tokens` rows: dense FFNs, shared experts."""
    if tokens <= 0 or f <= 0:
        return 0.0
    return (costs.dense_gemm(tokens, d, 2 * f // tp, sm_for_comm=sm_for_comm)
            + costs.dense_gemm(tokens, f // tp, d, sm_for_comm=sm_for_comm))


def side_ffn_width(cfg: ModelConfig) -> int:
    """Width of the FFN computed beside the routed experts: DeepSeek's shared experts, Arctic's dense residual."""
    return cfg.shared_ffn_dim + (cfg.dense_ffn_dim if cfg.dense_residual else 0)


def lm_head_time(costs: CostModel, cfg: ModelConfig, sequences: int, tp: int = 1) -> float:
    """Final norm and logits of the last position of each sequence (prefill returns only those)."""
    return costs.dense_gemm(max(sequences, 1), cfg.d_model, cfg.vocab_size // tp)
