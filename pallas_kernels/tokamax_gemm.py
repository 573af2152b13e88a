"""openxla/tokamax's ragged_dot behind the package's interface: a peer GroupGemm and a selectable backend.

tokamax (PyPI ``tokamax``, in the ``gpu`` and ``aot`` extras) picks its own implementation per device: its Pallas
Mosaic GPU kernels on Hopper and Blackwell, Triton elsewhere on GPU, XLA's ragged_dot otherwise. Like ``ragged_dot``
it needs group i of the rows to use ``rhs[i]``, so rows are permuted into slot order when groups do not map to slots in
order (a cache, a traced ``group_offset``) and the output is permuted back.

Off GPU this backend computes the reference's where-masked expansion instead (as ``ragged_dot`` does): tokamax
falls back to XLA:CPU's ragged_dot there, a 0/1-masked dense product that would carry one expert's NaN into every
row. :func:`group_gemm_tokamax` / :func:`expert_ffn_tokamax` call tokamax on any platform (the parity tests run
them on CPU through tokamax's XLA implementation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from epsjax.pallas_kernels import semantics, targets
from epsjax.pallas_kernels.errors import KernelError
from epsjax.pallas_kernels.ragged_dot import permute_to_slots


@functools.cache
def importable() -> bool:
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return False
    return True


def _tokamax():
    try:
        import tokamax
    except ImportError as e:
        raise KernelError("backend 'tokamax' needs the tokamax package: pip install 'epsjax[gpu]' (or [aot])") from e
    return tokamax


def _ragged_dot(lhs, rhs, sizes, implementation):
    return _tokamax().ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32,
                                 implementation=implementation)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _group_gemm(lhs, rhs, group_sizes, slots, implementation=None):
    perm, inv_perm, sizes, keep = permute_to_slots(group_sizes, slots, lhs.shape[0], rhs.shape[0])
    out = _ragged_dot(lhs[perm], rhs, sizes, implementation)  # [M, N] float32
    return jnp.where(keep[:, None], out[inv_perm], 0.0).astype(lhs.dtype)


def _gate_up_sorted(xp, w_gate, w_up, sizes, implementation):
    """silu(x @ w_gate[s]) * (x @ w_up[s]) in float32 on slot-ordered rows (two tokamax calls)."""
    return semantics.silu(_ragged_dot(xp, w_gate, sizes, implementation)) * _ragged_dot(xp, w_up, sizes,
                                                                                         implementation)


@functools.partial(jax.jit, static_argnames=("implementation",))
def _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, implementation=None):
    perm, inv_perm, sizes, keep = permute_to_slots(group_sizes, slots, x.shape[0], w_gate.shape[0])
    hidden = _gate_up_sorted(x[perm], w_gate, w_up, sizes, implementation).astype(x.dtype)  # [M, F]
    out = _ragged_dot(hidden, w_down, sizes, implementation)  # [M, D]
    return jnp.where(keep[:, None], out[inv_perm], 0.0).astype(x.dtype)


def group_gemm_tokamax(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None, implementation=None):
    """Grouped GEMM through tokamax.ragged_dot on any platform (implementation: tokamax's name, None = its
    choice for the device)."""
    semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
    slots = semantics.slot_of_group(group_sizes, rhs.shape[0], group_offset, slot_of_expert)
    return _group_gemm(lhs, rhs, group_sizes, slots, implementation=implementation)


def expert_ffn_tokamax(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
                       implementation=None):
    """Expert FFN through three tokamax.ragged_dot calls on slot-ordered rows, on any platform."""
    semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0], group_offset, slot_of_expert)
    return _expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots, implementation=implementation)


def implementation_here() -> str | None:
    """tokamax's implementation for the device the program is built for: its Mosaic GPU kernels on Hopper (named,
    so a build for a compile-only H100 gets them too: tokamax then reads the architecture from the default
    device), else tokamax's own choice."""
    return "mosaic_gpu" if targets.is_hopper_kind(targets.current().device_kind) else None


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None, tiling=None, interpret=False):
    """The backend: tokamax on GPU, the reference's where-masked expansion elsewhere (module docstring)."""
    _tokamax()
    if not targets.current().is_gpu:
        return semantics.group_gemm_reference(lhs, rhs, group_sizes, group_offset=group_offset,
                                              slot_of_expert=slot_of_expert)
    return group_gemm_tokamax(lhs, rhs, group_sizes, group_offset=group_offset, slot_of_expert=slot_of_expert,
                              implementation=implementation_here())


def gate_up(x, w_gate, w_up, group_sizes, *, tiling=None):
    """silu(x @ w_gate[g]) * (x @ w_up[g]) per group, in x's dtype (two tokamax calls: tokamax has no fused
    gate/up on GPU); for scripts/aot_check.py's per-kernel builds."""
    slots = semantics.slot_of_group(group_sizes, w_gate.shape[0])
    perm, inv_perm, sizes, keep = permute_to_slots(group_sizes, slots, x.shape[0], w_gate.shape[0])
    hidden = _gate_up_sorted(x[perm], w_gate, w_up, sizes, implementation_here())
    return jnp.where(keep[:, None], hidden[inv_perm], 0.0).astype(x.dtype)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None, tiling=None,
               interpret=False):
    """The backend: tokamax on GPU, the reference's where-masked expansion elsewhere (module docstring)."""
    _tokamax()
    if not targets.current().is_gpu:
        return semantics.expert_ffn_reference(x, w_gate, w_up, w_down, group_sizes, group_offset=group_offset,
                                              slot_of_expert=slot_of_expert)
    return expert_ffn_tokamax(x, w_gate, w_up, w_down, group_sizes, group_offset=group_offset,
                              slot_of_expert=slot_of_expert, implementation=implementation_here())
