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

# The flattened [B*T] tokens inside the MoE's shard_map: split over the batch's mesh axes and the expert-parallel
# axes, so that every device of an expert-parallel group routes different tokens.
MOE_TOKENS = "moe_tokens"

PARAM_AXES = (VOCAB, EMBED, HEADS, KV_HEADS, HEAD_DIM, Q_LORA, KV_LORA, MLP, EXPERTS, EXPERT_MLP, NORM)
ACTIVATION_AXES = (BATCH, SEQ, CACHE_SEQ, ACT_EMBED, ACT_HEADS, ACT_KV_HEADS, ACT_EXPERTS, MOE_TOKENS)
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"


def constrain(x, logical_axes: tuple[str | None, ...]):
    """Constrains an activation's sharding by logical axis names (MaxText's with_logical_constraint).

    A no-op unless a mesh is set and flax logical-axis rules are active (sharding/ sets both); a name the rules do
    not mention leaves that dimension to the compiler.
    """
    import jax
    from flax.core import spmd

    rules = spmd.get_logical_axis_rules()
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    if len(logical_axes) != x.ndim:
        raise RuntimeError(f"{logical_axes=} does not match an activation of shape {x.shape}")  # a layer's code
    table = dict(rules)
    spec = jax.sharding.PartitionSpec(*(
        table[name] if name in table else jax.sharding.PartitionSpec.UNCONSTRAINED for name in logical_axes))
    return jax.lax.with_sharding_constraint(x, spec)
