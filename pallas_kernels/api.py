"""The two calls the models layer makes: ``group_gemm`` and ``expert_ffn``.

Both dispatch on ``backend`` to one implementation; ``"auto"`` asks
:func:`pallas_kernels.selector.select_backend` (static shapes, device kind).
The semantics every backend shares are in :mod:`pallas_kernels.semantics`.
"""

from __future__ import annotations

from pallas_kernels import ragged_dot, selector, semantics

# name -> (group_gemm implementation, expert_ffn implementation)
_IMPLS = {
    "reference": (semantics.group_gemm_reference, semantics.expert_ffn_reference),
    "ragged_dot": (ragged_dot.group_gemm, ragged_dot.expert_ffn),
}


def group_gemm(lhs, rhs, group_sizes, *, group_offset=0, slot_of_expert=None,
               backend: str = "auto", tiling=None, interpret: bool = False):
  """Grouped GEMM over rows sorted by group.

  Args:
    lhs: [M, K] rows sorted by group; rows at index >= sum(group_sizes) are
      padding and produce zero rows.
    rhs: [E, K, N] weight matrices (E local experts, or S cache slots).
    group_sizes: [G] int32 rows per group (traced).
    group_offset: first local expert (int or traced int32 scalar): group g uses
      rhs[g - group_offset] when group_offset <= g < group_offset + E; rows
      of other groups produce zeros.
    slot_of_expert: optional [G] int32: group g uses rhs[slot_of_expert[g]];
      -1 (not resident) produces zeros.  Requires group_offset == 0 (static).
    backend: "auto" or one of :data:`pallas_kernels.selector.BACKENDS`.
    tiling: the backend's tiling object, or None for its default / the table.
    interpret: run Pallas backends in interpret mode (CPU testing).

  Returns:
    [M, N] in lhs.dtype, accumulated in float32.
  """
  semantics.check_group_gemm_args(lhs, rhs, group_sizes, group_offset, slot_of_expert)
  name, tiling = _resolve(backend, tiling, lhs, rhs.shape[0], group_sizes.shape[0],
                          rhs.shape[1], rhs.shape[2], interpret, op="group_gemm")
  impl = _IMPLS[name][0]
  kwargs = _backend_kwargs(name, tiling, interpret)
  return impl(lhs, rhs, group_sizes, group_offset=group_offset, slot_of_expert=slot_of_expert, **kwargs)


def expert_ffn(x, w_gate, w_up, w_down, group_sizes, *, group_offset=0, slot_of_expert=None,
               backend: str = "auto", tiling=None, interpret: bool = False):
  """Per-row expert FFN: y = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e].

  Args:
    x: [M, D] rows sorted by group (padding rows past sum(group_sizes) -> 0).
    w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    group_sizes, group_offset, slot_of_expert, backend, tiling, interpret: as
      in :func:`group_gemm` (e = the group's slot; slotless rows -> 0).

  Returns:
    [M, D] in x.dtype.  Accumulation is float32; the hidden [M, F] is
    rounded to x.dtype between the fused gate/up GEMM and the down GEMM.
  """
  semantics.check_expert_ffn_args(x, w_gate, w_up, w_down, group_sizes, group_offset, slot_of_expert)
  name, tiling = _resolve(backend, tiling, x, w_gate.shape[0], group_sizes.shape[0],
                          w_gate.shape[1], w_gate.shape[2], interpret, op="expert_ffn")
  impl = _IMPLS[name][1]
  kwargs = _backend_kwargs(name, tiling, interpret)
  return impl(x, w_gate, w_up, w_down, group_sizes, group_offset=group_offset,
              slot_of_expert=slot_of_expert, **kwargs)


def _resolve(backend, tiling, lhs, num_slots, num_groups, k, n, interpret, op):
  if backend == "auto":
    choice = selector.select_backend(
        tokens_per_expert=lhs.shape[0] / max(num_groups, 1), num_experts=num_slots,
        k=k, n=n, dtype=lhs.dtype, op=op)
    return choice.backend, tiling if tiling is not None else choice.tiling
  if backend not in _IMPLS:
    raise ValueError(f"unknown backend {backend=}; expected 'auto' or one of {sorted(_IMPLS)}")
  return backend, tiling


def _backend_kwargs(name, tiling, interpret):
  if name in ("reference", "ragged_dot"):
    if tiling is not None:
      raise ValueError(f"backend {name!r} takes no tiling; got {tiling=}")
    return {}
  return {"tiling": tiling, "interpret": interpret}
