"""The narrow interface through which an MoE block runs its routed experts, and the pieces its implementations share.

The block (models/moe.py) owns the router, the stacked expert weights and the shared experts; *how* the routed
experts run (one device, expert parallelism over a mesh, disaggregated, offloaded) is an `ExpertCompute` passed
at call time. Every implementation has the same contract:

    y_TD, stats = experts(x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T)

y_TD[t] = sum_k weights_TK[t, k] * FFN_{ids_TK[t, k]}(x_TD[t]) for valid tokens (0 for invalid ones), and
stats reports the tokens routed to each expert and how many assignments were dropped (0 unless a capacity was
asked for). Implementations are frozen dataclasses: hashable, so they can be static arguments of jit. One may
also expose `compiler_options`, XLA options the programs that run it should be compiled with (EPExperts asks
for XLA:GPU's latency-hiding scheduler); the Engine passes them to jax.jit.
It lives here, below models/, so that sharding's expert-parallel implementation does not import models/.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MoEStats:
    tokens_per_expert: jax.Array  # [E] int32: valid (token, k) assignments routed to each expert
    dropped: jax.Array            # [] int32: assignments dropped by a capacity limit


jax.tree_util.register_dataclass(MoEStats, data_fields=["tokens_per_expert", "dropped"], meta_fields=[])


class ExpertCompute(Protocol):
    def __call__(self, x_TD, ids_TK, weights_TK, w_gate_EDF, w_up_EDF, w_down_EFD, valid_T) -> tuple[
            jax.Array, MoEStats]: ...


def sort_by_expert(ids_TK, valid_T, num_experts: int):
    """Orders the T*K (token, k) assignments by expert; invalid ones go last under the sentinel id E.

    Returns order [T*K] (sorted position -> flat assignment index), sorted ids [T*K] and group_sizes [E].
    """
    K = ids_TK.shape[1]
    flat_ids = jnp.where(jnp.repeat(valid_T, K), ids_TK.reshape(-1), num_experts)
    order = jnp.argsort(flat_ids, stable=True)
    group_sizes = jnp.zeros((num_experts,), jnp.int32).at[flat_ids].add(1, mode="drop")
    return order, flat_ids[order], group_sizes


def combine(y_sorted_MD, order_M, weights_TK):
    """Un-sorts expert outputs [T*K, D] back to (token, k) and sums them weighted by the router: [T, D] float32."""
    T, K = weights_TK.shape
    y_MD = jnp.zeros_like(y_sorted_MD).at[order_M].set(y_sorted_MD)
    return jnp.einsum("TKD,TK->TD", y_MD.reshape(T, K, -1).astype(jnp.float32), weights_TK.astype(jnp.float32))
