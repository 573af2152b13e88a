"""Shared test material: tolerances, random operands, an independent numpy oracle.

The oracle is a per-group numpy loop in float64, written without any code of
pallas_kernels, so a bug shared by a kernel and the package's jnp reference
still fails the tests.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from hypothesis import strategies as st

# (rtol, atol) per dtype for outputs of O(1) magnitude, against the float64 oracle.
# bfloat16 / float16: output rounding (2^-9 / 2^-12 relative) plus float32 accumulation.
TOLERANCE = {
    "float32": (2e-5, 2e-5),
    "bfloat16": (1e-2, 1e-2),
    "float16": (2e-3, 2e-3),
}
# The expert FFN rounds its hidden activations to the dtype; one-ulp differences
# in that rounding between the kernel and the oracle reach the output.
FFN_TOLERANCE = {
    "float32": (1e-4, 1e-4),
    "bfloat16": (3e-2, 3e-2),
    "float16": (5e-3, 5e-3),
}
DTYPES = ("float32", "bfloat16", "float16")


def on_gpu() -> bool:
    return any(d.platform == "gpu" for d in jax.devices())


def random_operands(seed, m, k, n, e, dtype):
    """lhs [M, K] ~ N(0, 1) and rhs [E, K, N] ~ N(0, 1/K): outputs are O(1)."""
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = (rng.standard_normal((e, k, n)) / np.sqrt(k)).astype(np.float32)
    return jnp.asarray(lhs, dtype), jnp.asarray(rhs, dtype)


def random_ffn_operands(seed, m, d, f, e, dtype):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, d)).astype(np.float32)
    w_gate = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    w_up = (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32)
    w_down = (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32)
    return tuple(jnp.asarray(a, dtype) for a in (x, w_gate, w_up, w_down))


def expected_slots(num_groups, num_slots, group_offset=0, slot_of_expert=None):
    """The slot of each group, spelled out from the API docstring (-1: zeros)."""
    slots = []
    for g in range(num_groups):
        s = int(slot_of_expert[g]) if slot_of_expert is not None else g - group_offset
        slots.append(s if 0 <= s < num_slots else -1)
    return slots


def oracle_group_gemm(lhs, rhs, group_sizes, slots):
    """float64 numpy: out rows of group g = lhs rows @ rhs[slots[g]], zeros elsewhere."""
    lhs = np.asarray(lhs, np.float64)
    rhs = np.asarray(rhs, np.float64)
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for size, slot in zip(np.asarray(group_sizes), slots):
        if slot >= 0:
            out[start:start + size] = lhs[start:start + size] @ rhs[slot]
        start += size
    return out


def oracle_expert_ffn(x, w_gate, w_up, w_down, group_sizes, slots):
    """float64 numpy FFN with the hidden rounded to x's dtype, as the kernels store it."""
    x64 = np.asarray(x, np.float64)
    out = np.zeros(x64.shape)
    start = 0
    for size, slot in zip(np.asarray(group_sizes), slots):
        if slot >= 0:
            rows = x64[start:start + size]
            gate = rows @ np.asarray(w_gate[slot], np.float64)
            up = rows @ np.asarray(w_up[slot], np.float64)
            hidden = gate / (1 + np.exp(-gate)) * up
            hidden = hidden.astype(_np_dtype(x.dtype)).astype(np.float64)
            out[start:start + size] = hidden @ np.asarray(w_down[slot], np.float64)
        start += size
    return out


def _np_dtype(dtype):
    name = jnp.dtype(dtype).name
    return {"bfloat16": ml_dtypes.bfloat16}.get(name, np.dtype(name))


def assert_close(out, expected, dtype, table=None):
    table = TOLERANCE if table is None else table
    rtol, atol = table[jnp.dtype(dtype).name]
    assert out.dtype == jnp.dtype(dtype), (out.dtype, dtype)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=rtol, atol=atol)


@st.composite
def group_sizes(draw, m, num_groups):
    """[G] int32 sizes summing to at most M: zeros, groups straddling tiles, padding."""
    raw = draw(st.lists(st.one_of(st.just(0), st.integers(1, m)), min_size=num_groups, max_size=num_groups))
    sizes, used = [], 0
    for size in raw:  # clip so the running total stays <= M
        size = min(size, m - used)
        sizes.append(size)
        used += size
    return np.asarray(sizes, np.int32)


@st.composite
def indirection(draw, num_groups, num_slots):
    """One of: none, a group offset (EP), a slot table with -1 (cache).  Returns kwargs."""
    mode = draw(st.sampled_from(["none", "offset", "slots"]))
    if mode == "offset":
        return {"group_offset": draw(st.integers(-num_slots, num_groups))}
    if mode == "slots":
        perm = draw(st.permutations(list(range(num_slots)) + [-1] * num_groups))
        return {"slot_of_expert": jnp.asarray(perm[:num_groups], jnp.int32)}
    return {}
