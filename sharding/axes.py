"""Logical axis names shared by models/ (which annotates with them) and sharding/ (which maps them to mesh axes).

Parameters and activations use different names where they may be sharded differently (MaxText's convention):
the expert weights are split over `experts`, while routed token activations use `act_experts`.
"""

# Parameter axes.
VOCAB = "vocab"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
Q_LORA = "q_lora"
KV_LORA = "kv_lora"
MLP = "mlp"
EXPERTS = "experts"
EXPERT_MLP = "expert_mlp"
NORM = "norm"

# Activation axes.
BATCH = "batch"
SEQ = "seq"
CACHE_SEQ = "cache_seq"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_EXPERTS = "act_experts"
