"""The MoE FFN block and `LocalExperts`, the single-device implementation of its expert-compute interface.

The block owns the router, the stacked expert weights and the shared experts; *how* the routed experts run is an
`ExpertCompute` passed at call time (the contract is in sharding/expert_compute.py).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from epsjax import pallas_kernels
from epsjax.models.config import ConfigError, ModelConfig
from epsjax.models.layers import GatedMLP, param
from epsjax.models.router import Router
from epsjax.sharding import axes
from epsjax.sharding.errors import PlanError
from epsjax.sharding.expert_compute import ExpertCompute, MoEStats, combine, sort_by_expert


def apply_capacity(ids_TK, valid_T, num_experts: int, capacity: int):
    """Marks assignments beyond `capacity` per expert (in token order) invalid. Returns new ids [T, K] with
    dropped assignments set to the sentinel E, and the number dropped."""
    T, K = ids_TK.shape
    order, sorted_ids, group_sizes = sort_by_expert(ids_TK, valid_T, num_experts)
    starts_E = jnp.cumsum(group_sizes) - group_sizes
    starts = jnp.concatenate([starts_E, jnp.array([T * K], jnp.int32)])
    rank_sorted = jnp.arange(T * K, dtype=jnp.int32) - starts[sorted_ids]
    rank_flat = jnp.zeros((T * K,), jnp.int32).at[order].set(rank_sorted)
    valid_flat = jnp.repeat(valid_T, K)
    keep_flat = valid_flat & (rank_flat < capacity)
    dropped = jnp.sum(valid_flat & ~keep_flat).astype(jnp.int32)
    return jnp.where(keep_flat, ids_TK.reshape(-1), num_experts).reshape(T, K), dropped


@dataclasses.dataclass(frozen=True)
class LocalExperts:
    """All experts on this device: sort by expert, one grouped expert FFN (pallas_kernels), un-sort, combine.

    backend: a pallas_kernels backend name, or "auto" for the load-aware selector.
    capacity_factor: None is dropless (the default). Otherwise each expert takes at most
        ceil(capacity_factor * T * K / E) assignments, in token order, and MoEStats.dropped counts the rest.
    """

    backend: str = "auto"
    capacity_factor: float | None = None

    def __post_init__(self):
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(f"capacity_factor must be positive or None, got {self.capacity_factor}")

    def __call__(self, x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T):
        T, K = ids_TK.shape
        E = w_gate_EDF.shape[0]
        _, _, routed_E = sort_by_expert(ids_TK, valid_T, E)
        dropped = jnp.zeros((), jnp.int32)
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * T * K / E)
            ids_TK, dropped = apply_capacity(ids_TK, valid_T, E, capacity)
        order, _, group_sizes = sort_by_expert(ids_TK, valid_T, E)
        x_sorted_MD = x_TD[order // K]  # [T*K, D]
        with jax.named_scope("routed_experts"):
            y_sorted_MD = pallas_kernels.expert_ffn(x_sorted_MD, w_gate_EDF, w_up_EDF, w_down_EFD, group_sizes,
                                                    backend=self.backend)
        y_TD = combine(y_sorted_MD, order, weights_TK).astype(x_TD.dtype)
        return y_TD, MoEStats(tokens_per_expert=routed_E, dropped=dropped)


def _check_expert_layout(rows: int, num_experts: int, experts) -> None:
    """Expert weights stored in a placement's slot order (epsjax.placement, for expert counts that do not divide the
    EP size, or replicas) only make sense to an expert compute that knows that placement."""
    if rows == num_experts:
        return
    placement = getattr(experts, "placement", None)
    if placement is None or (placement.num_experts, placement.num_slots) != (num_experts, rows):
        raise PlanError(f"the routed-expert weights hold {rows} slots for {num_experts} experts (placed for expert "
                        f"parallelism), but the expert compute {type(experts).__name__} has "
                        f"{'no' if placement is None else 'a different'} placement of them; pass the one the model "
                        f"was placed with (EPExperts(placement=...), epsjax.placement.ep_experts)")


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        E, D, F, dt = cfg.num_experts, cfg.d_model, cfg.expert_ffn_dim, cfg.jnp_dtype
        self.router = Router(D, E, cfg.router, dtype=dt, rngs=rngs)
        self.w_gate_EDF = param(rngs, (E, D, F), (axes.EXPERTS, axes.EMBED, axes.EXPERT_MLP), dt)
        self.w_up_EDF = param(rngs, (E, D, F), (axes.EXPERTS, axes.EMBED, axes.EXPERT_MLP), dt)
        self.w_down_EFD = param(rngs, (E, F, D), (axes.EXPERTS, axes.EXPERT_MLP, axes.EMBED), dt)
        self.shared = GatedMLP(D, cfg.shared_ffn_dim, dtype=dt, rngs=rngs) if cfg.shared_ffn_dim else None

    def __call__(self, x_BTD, valid_BT, experts: ExpertCompute):
        B, T, D = x_BTD.shape
        ids_TK, weights_TK = self.route(x_BTD)
        y_TD, stats = self.routed(x_BTD.reshape(B * T, D), ids_TK, weights_TK, valid_BT.reshape(B * T), experts)
        return self.add_shared(x_BTD, y_TD.reshape(B, T, D)), stats

    # The pieces of __call__, for runtimes that must see the routing before the experts run (epsjax/offload).

    def routed(self, x_TD, ids_TK, weights_TK, valid_T, experts: ExpertCompute):
        """The routed experts' weighted output [T, D] for the router's choice, by `experts`, and its statistics."""
        _check_expert_layout(self.w_gate_EDF.shape[0], self.router.kernel_DE.shape[1], experts)
        return experts(x_TD, ids_TK, weights_TK, self.w_gate_EDF[...], self.w_up_EDF[...], self.w_down_EFD[...],
                       valid_T)

    def route(self, x_BTD):
        """The router's choice for the block's input x [B, T, D]: ids [B*T, K] int32, weights [B*T, K] float32."""
        B, T, D = x_BTD.shape
        return self.router(x_BTD.reshape(B * T, D))

    def add_shared(self, x_BTD, y_BTD):
        """The routed experts' output y [B, T, D] plus the shared experts' (if any) on the block's input x."""
        return y_BTD if self.shared is None else y_BTD + self.shared(x_BTD)
