"""A NaN or Inf in one expert's weights reaches only the rows routed to that expert, whatever backend runs (a
kernel must mask other rows out, never multiply them by zero: 0 * NaN = NaN)."""

import jax.numpy as jnp
import numpy as np
import pytest

from epsjax import pallas_kernels as pk
from epsjax.models import LocalExperts
from epsjax.pallas_kernels import ChunkTiling, DenseTiling, MosaicTiling, TritonTiling

from . import kernel_cases as kc

BACKENDS = [
    ("reference", None, False),
    ("ragged_dot", None, False),
    ("dense", DenseTiling(), False),
    ("dense", DenseTiling((8,), fallback="chunked"), False),  # the load overflows the bucket: the fallback runs
    ("chunked", ChunkTiling(8), False),
    ("chunked", ChunkTiling(64, 16), False),  # windows reach into the next group's rows
    ("pallas_triton", TritonTiling(16, 32, 32), True),
    ("mosaic_gpu", MosaicTiling(64, 64, 64, 2, num_sms=2, consumers=1), True),
]
SIZES = np.array([5, 11, 0, 9, 7, 0, 12, 4], np.int32)  # 48 rows, then 8 padding rows
BAD = 3  # the poisoned expert: rows 16..24 (5 + 11 + 0 = 16 rows before it)


@pytest.mark.parametrize("poison", [np.nan, np.inf])
@pytest.mark.parametrize("backend,tiling,interpret", BACKENDS, ids=lambda x: str(x)[:30])
def test_a_nonfinite_expert_reaches_only_its_rows(backend, tiling, interpret, poison):
    dtype = "float32" if backend in ("reference", "ragged_dot", "dense", "chunked") else "bfloat16"
    x, w_gate, w_up, w_down = kc.random_ffn_operands(0, 56, 64, 64, 8, dtype)
    w_gate = w_gate.at[BAD, 5, 7].set(poison)
    w_down = w_down.at[BAD, 1, 2].set(poison)
    out = np.asarray(pk.expert_ffn(x, w_gate, w_up, w_down, jnp.asarray(SIZES), backend=backend, tiling=tiling,
                                   interpret=interpret), np.float32)
    start = int(SIZES[:BAD].sum())
    mine = np.zeros(56, bool)
    mine[start:start + SIZES[BAD]] = True
    assert np.isfinite(out[~mine]).all(), np.argwhere(~np.isfinite(out[~mine]))[:5]
    assert not np.isfinite(out[mine]).all(axis=1).any()  # every routed row sees it
    gg = np.asarray(pk.group_gemm(x, w_gate, jnp.asarray(SIZES), backend=backend, tiling=tiling,
                                  interpret=interpret), np.float32)
    assert np.isfinite(gg[~mine]).all() and not np.isfinite(gg[mine]).all(axis=1).any()


def test_the_moe_layer_confines_a_nonfinite_expert_to_its_tokens():
    # Through LocalExperts with the default (load-aware) backend: the same in the model's own path.
    x, w_gate, w_up, w_down = kc.random_ffn_operands(1, 32, 64, 64, 8, "float32")
    ids = np.stack([np.arange(32) % 8, (np.arange(32) + 3) % 8], 1).astype(np.int32)  # two experts per token
    w_up = w_up.at[BAD].set(np.nan)
    y, _ = LocalExperts()(x, jnp.asarray(ids), jnp.full((32, 2), 0.5), w_gate, w_up, w_down, jnp.ones(32, bool))
    routed = (ids == BAD).any(axis=1)
    y = np.asarray(y)
    assert np.isfinite(y[~routed]).all() and not np.isfinite(y[routed]).all(axis=1).any()
