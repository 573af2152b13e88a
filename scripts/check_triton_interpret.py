"""Run the jax-triton backend's Triton kernel in Triton's interpreter on torch CPU tensors, against a torch loop.

jax has no interpret mode for jax-triton, and no GPU has been lent, so this is how the kernel's numerics are
checked without one. It needs torch and triton, which live in the peers' Python 3.11 venv, not the project's:

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/peer311
    /tmp/peer311/bin/pip install torch==2.13.0 triton==3.6.0 numpy
    /tmp/peer311/bin/python scripts/check_triton_interpret.py

The kernel module (pallas_kernels/triton_kernel.py) imports no jax; the work list (tile, lo, hi, slot per item)
is rebuilt here in numpy from its documented rule, so nothing of pallas_kernels but the kernel is under test.
Exits 1 when any case differs from the reference by more than the tolerance.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_patch_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    # triton 3.6's interpreter turns a loaded scalar (a 1-element array) into a Python int with int(array),
    # which numpy 2 refuses; the kernel's K loop bound is such a scalar.
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor


def load_kernel():
    spec = importlib.util.spec_from_file_location("triton_kernel", ROOT / "pallas_kernels" / "triton_kernel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.tl = triton.language  # the interpreter patches the triton.language it finds in the kernel's globals
    return module.triton_kernel()


def work_list(sizes, slots, block_m):
    """(tile, lo, hi, slot) per aligned row tile x group segment, then idle items (lo == hi)."""
    items, start = [], 0
    for size, slot in zip(sizes, slots):
        lo, hi = start, start + size
        while lo < hi:
            tile = lo // block_m
            end = min(hi, (tile + 1) * block_m)
            items.append((tile, lo, end, slot))
            lo = end
        start = hi
    items += [(0, 0, 0, -1)] * 3
    return [torch.tensor([it[i] for it in items], dtype=torch.int32) for i in range(4)]


def run_case(kernel, m, k, n, sizes, slots, block, fused, dtype, seed):
    rng = np.random.default_rng(seed)
    num_slots = max(slots) + 1
    lhs = torch.tensor(rng.standard_normal((m, k)), dtype=dtype)
    rhs = torch.tensor(rng.standard_normal((num_slots, k, n)) / np.sqrt(k), dtype=dtype)
    up = torch.tensor(rng.standard_normal((num_slots, k, n)) / np.sqrt(k), dtype=dtype)
    out = torch.full((m, n), 7.0, dtype=dtype)  # rows no item owns keep 7: padding is never written
    bm, bn, bk = block
    tile, lo, hi, slot = work_list(sizes, slots, bm)
    grid = (len(tile), -(-n // bn))
    kernel[grid](tile, lo, hi, slot, lhs, rhs, up, out, M=m, K=k, N=n, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                 FUSED=fused)
    expected = torch.full((m, n), 7.0, dtype=torch.float64)
    start = 0
    for size, s in zip(sizes, slots):
        rows = slice(start, start + size)
        if s < 0:
            expected[rows] = 0.0
        else:
            a = lhs[rows].double() @ rhs[s].double()
            if fused:
                a = torch.nn.functional.silu(a) * (lhs[rows].double() @ up[s].double())
            expected[rows] = a
        start += size
    return (out.double() - expected).abs().max().item()


CASES = [  # m, k, n, group sizes, slots (-1: not resident), (block_m, block_n, block_k)
    (100, 64, 96, [30, 0, 50], [0, 1, -1], (16, 64, 32)),         # N tail (96 = 64 + 32), a slotless group, padding
    (130, 96, 80, [1, 64, 40, 20], [3, 0, 1, 2], (64, 64, 32)),   # groups straddle tiles, N tail, one-row group
    (70, 48, 40, [0, 70], [0, 1], (32, 32, 16)),                  # empty group, K = 3 blocks, N tail
    (64, 40, 64, [64], [0], (64, 64, 32)),                        # K tail (40 = 32 + 8): the masked K path
    (257, 64, 128, [0, 0, 257, 0], [0, 1, 2, 3], (64, 128, 64)),  # one expert takes everything, M not a tile multiple
]


def main() -> int:
    kernel = load_kernel()
    worst = {}
    failures = 0
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.float16, 2e-2)):
        for i, (m, k, n, sizes, slots, block) in enumerate(CASES):
            for fused in (False, True):
                err = run_case(kernel, m, k, n, sizes, slots, block, fused, dtype, seed=i)
                ok = err <= tolerance
                failures += not ok
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), err)
                print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):14s} m={m} k={k} n={n} sizes={sizes} slots={slots} "
                      f"block={block} fused={fused}: max |error| {err:.2e} (tolerance {tolerance:g})")
    print(f"{2 * 2 * len(CASES) - failures} of {2 * 2 * len(CASES)} cases within tolerance; worst {worst}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
