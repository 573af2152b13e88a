"""Which backend and tiling to run for a load: measured tables, then rules.

``select_backend`` looks for the profile table of the device kind in
``pallas_kernels/profiles/*.json`` (written by ``scripts/profile_gemm.py``,
one file per device kind, named by :func:`table_name`; a table whose
``device_family`` is a substring of the kind also matches; tables say whether
they were measured on a CPU or a GPU).  In the table it takes the entries of
the same op (the expert FFN falls back to GroupGemm entries), the same dtype when
there are any, the nearest shape ``(E, K, N)`` in log distance, the same load
kind (``"balanced"``, or ``"skewed"`` when ``max_tokens_per_expert`` exceeds
twice the mean), and the nearest measured tokens per expert (log2); among the
backends measured there that can run natively here it returns the fastest one
and its tiling.

Fallback when no table matches (documented rules, no measurement behind
them):

* CPU: ``"dense"`` for balanced loads of >= 32 tokens per expert (capacity buckets up to 1.5x the mean, with
  the grouped fallback past that), otherwise ``"chunked"`` (a grouped loop whose work does not grow with skew,
  its windows sized from the load).  Never ragged_dot (XLA:CPU expands it into a masked dense product) and never
  an interpret-mode Pallas kernel.
* Hopper GPU (sm_90), 16-bit types, ``K % 64 == N % 128 == 0``:
  ``"mosaic_gpu"`` below 4096 tokens per expert, ``"dense"`` from 4096 on
  (EPS-MoE's crossover: GroupGemm wins below ~2K tokens per expert and
  DenseGemm above ~4K).
* Other GPUs: ``"pallas_triton"`` below 4096 tokens per expert, ``"dense"``
  above.  float32 operands on GPU: ``"ragged_dot"`` below 4096, ``"dense"`` above.
* ``"tokamax"`` (openxla/tokamax's ragged_dot) is never a rule's choice: only a table that measured it fastest
  picks it, on a GPU where it imports.

``"auto"`` in :func:`pallas_kernels.group_gemm` calls this with the static
shape ``M / G`` as tokens per expert and the default (balanced) load.

The device is the one the program is built for (:func:`pallas_kernels.targets.current`): the mesh in
context when it names one (so tracing under compile-only H100 devices selects the Hopper kernels on a
CPU-only machine), else the default device.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import re

import jax.numpy as jnp

from epsjax.pallas_kernels import targets

BACKENDS = ("reference", "ragged_dot", "dense", "chunked", "pallas_triton", "mosaic_gpu", "jax_triton", "tokamax")
GPU_ONLY = ("pallas_triton", "mosaic_gpu", "jax_triton")  # compiled kernels; the first two also interpret
PROFILE_DIR = pathlib.Path(__file__).parent / "profiles"
DENSE_CROSSOVER_TOKENS = 4096  # EPS-MoE: DenseGemm wins above ~4K tokens per expert
CPU_DENSE_MIN_TOKENS = 32
SKEW_RATIO = 2.0


@dataclasses.dataclass(frozen=True)
class Choice:
    """A backend name, its tiling object (None = default) and why it was chosen."""

    backend: str
    tiling: object = None
    reason: str = ""


def device_kind() -> str:
    """The kind of the device the program is built for, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"cpu"``: the
    context mesh's (``jax.set_mesh``, inside ``shard_map``) when it has one, else the default device's."""
    return targets.current().device_kind


def platform() -> str:
    """The platform the program is built for ("cpu", "gpu"), found as :func:`device_kind` is."""
    return targets.current().platform


def table_name(kind: str) -> str:
    """The table file stem of a device kind: lower case, runs of other characters -> ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", kind.lower()).strip("_")


@functools.lru_cache(maxsize=None)
def load_table(kind: str) -> dict | None:
    """The profile table of a device kind, or None (exact file name, then family match)."""
    path = PROFILE_DIR / f"{table_name(kind)}.json"
    if path.exists():
        return json.loads(path.read_text())
    for path in sorted(PROFILE_DIR.glob("*.json")):
        table = json.loads(path.read_text())
        family = table.get("device_family")
        if family and family.lower() in kind.lower():
            return table
    return None


def available(backend: str, plat: str) -> bool:
    """Whether ``backend`` runs natively (compiled, not interpreted) on ``plat``."""
    if backend == "reference":
        return False  # a test oracle, never a choice
    if backend == "tokamax":  # chosen only where a table measured it (on GPU: off GPU it runs the reference)
        from epsjax.pallas_kernels import tokamax_gemm

        return plat in ("gpu", "cuda") and tokamax_gemm.importable()
    if backend in GPU_ONLY:
        if plat not in ("gpu", "cuda"):
            return False
        if backend == "jax_triton":
            from epsjax.pallas_kernels import group_gemm_jax_triton

            return group_gemm_jax_triton.importable()
    return True


def select_backend(*, tokens_per_expert: float, num_experts: int, k: int, n: int, dtype,
                   op: str = "group_gemm", max_tokens_per_expert: float | None = None,
                   kind: str | None = None, plat: str | None = None,
                   exclude: tuple[str, ...] = ()) -> Choice:
    """The backend and tiling for a load.

    Args:
      tokens_per_expert: mean rows per expert (M / G for a static shape).
      num_experts: E (rhs slots).
      k, n: the GEMM's contracting and output dims (D and F for the expert FFN).
      dtype: operand dtype.
      op: "group_gemm" or "expert_ffn".
      max_tokens_per_expert: the fullest expert's rows, when known (skew).
      kind, plat: device kind and platform (default: those the program is built for).
      exclude: backend names not to return (e.g. the dense path's own fallback).
    """
    kind = device_kind() if kind is None else kind
    plat = platform() if plat is None else plat
    dtype = jnp.dtype(dtype)
    skewed = (max_tokens_per_expert is not None and tokens_per_expert > 0
              and max_tokens_per_expert > SKEW_RATIO * tokens_per_expert)
    table = load_table(kind)
    if table is not None:
        choice = _from_table(table, tokens_per_expert, num_experts, k, n, dtype, op,
                             "skewed" if skewed else "balanced", plat, exclude)
        if choice is not None:
            return choice
    return _rules(tokens_per_expert, k, n, dtype, kind, plat, skewed, exclude, op)


def _from_table(table, tpe, e, k, n, dtype, op, load, plat, exclude) -> Choice | None:
    usable = [x for x in table["entries"] if x.get("seconds") and available(x["backend"], plat)
              and x["backend"] not in exclude]
    entries = [x for x in usable if x["op"] == op] or [x for x in usable if x["op"] == "group_gemm"]
    same_dtype = [x for x in entries if x["dtype"] == dtype.name]
    entries = same_dtype or entries
    if not entries:
        return None

    def log_dist(x, keys):  # tokens per expert go below 1 at decode; the floor only guards log(0)
        return sum(abs(math.log2(max(x[key], 1 / 64)) - math.log2(max(val, 1 / 64))) for key, val in keys)

    best_shape = min(log_dist(x, (("E", e), ("K", k), ("N", n))) for x in entries)
    entries = [x for x in entries if log_dist(x, (("E", e), ("K", k), ("N", n))) == best_shape]
    entries = [x for x in entries if x["load"] == load] or entries
    best_tpe = min(log_dist(x, (("tokens_per_expert", tpe),)) for x in entries)
    entries = [x for x in entries if log_dist(x, (("tokens_per_expert", tpe),)) == best_tpe]
    # Fastest by throughput (rows per second, same shape): comparable when two measured loads tie for nearest.
    fastest = max(entries, key=lambda x: x["tokens_per_expert"] / x["seconds"])
    tiling = tiling_from_dict(fastest["backend"], fastest.get("tiling"))
    return Choice(fastest["backend"], tiling,
                  f"table {table_name(table['device_kind'])}: fastest at E={fastest['E']} K={fastest['K']} "
                  f"N={fastest['N']} {fastest['load']} {fastest['tokens_per_expert']} tokens/expert")


def _rules(tpe, k, n, dtype, kind, plat, skewed, exclude, op) -> Choice:
    def pick(*names, reason):
        for name in names:
            if name not in exclude:
                return Choice(name, None, f"fallback rule: {reason}")
        return Choice("ragged_dot", None, "fallback rule: everything else excluded")

    if plat not in ("gpu", "cuda"):
        if not skewed and tpe >= CPU_DENSE_MIN_TOKENS:
            return pick("dense", "chunked", reason="CPU, balanced load")
        return pick("chunked", "dense", reason="CPU")
    from epsjax.pallas_kernels import group_gemm_mgpu

    if targets.is_hopper_kind(kind) and group_gemm_mgpu.supports(dtype, k, n, op=op):
        grouped, regime = ("mosaic_gpu", "pallas_triton", "ragged_dot"), "Hopper GroupGemm regime"
    elif dtype.itemsize == 2:
        grouped, regime = ("pallas_triton", "ragged_dot"), "GPU GroupGemm regime"
    else:
        grouped, regime = ("ragged_dot",), "GPU, float32"
    if tpe >= DENSE_CROSSOVER_TOKENS and not skewed:
        return pick("dense", *grouped, reason=f">= {DENSE_CROSSOVER_TOKENS} tokens per expert")
    return pick(*grouped, reason=regime)


def candidate_tilings(backend: str) -> tuple:
    """The tilings ``scripts/profile_gemm.py`` times for ``backend`` (so every tiling a measured table can
    name), None (the backend's default) first. ``scripts/aot_check.py`` compiles each for sm_90a and its test
    asserts that none spills registers or serializes wgmma; a tiling a kernel refuses for an op (the Mosaic
    resource model) is skipped there."""
    from epsjax.pallas_kernels import chunked_gemm, group_gemm_mgpu, group_gemm_triton

    mosaic, triton = group_gemm_mgpu.MosaicTiling, group_gemm_triton.TritonTiling
    candidates = {
        "mosaic_gpu": (None, mosaic(128, 128, 64, 4), mosaic(64, 256, 64, 4), mosaic(256, 128, 64, 4),
                       mosaic(128, 128, 128, 4), mosaic(128, 128, 64, 4, consumers=1),
                       # the planar-snake tile order (L2 reuse of weight blocks across a wave)
                       mosaic(128, 128, 64, 4, grid_band=4), mosaic(128, 256, 64, 4, grid_band=8)),
        # the FP8 (8-bit wgmma) kernels: block_k is one 128-byte swizzle row of e4m3. Compiled for sm_90a,
        # 64-row blocks and four stages of 128x128 spilled 4-16 bytes (not accumulators), so they are not here.
        "mosaic_gpu_fp8": (None, mosaic(128, 128, 128, 3), mosaic(128, 128, 128, 3, grid_band=4),
                           mosaic(128, 256, 128, 4, grid_band=8)),
        "pallas_triton": (None, triton(128, 128, 32, 8, 3), triton(16, 64, 64, 4, 4), triton(64, 256, 64, 8, 3)),
        "jax_triton": (None, triton(128, 128, 32, 8, 3), triton(16, 64, 64, 4, 4), triton(64, 256, 64, 8, 3)),
        "dense": (None,),
        "chunked": (None, chunked_gemm.ChunkTiling(8), chunked_gemm.ChunkTiling(32, 8),
                    chunked_gemm.ChunkTiling(128, 16), chunked_gemm.ChunkTiling(512, 32)),
        "ragged_dot": (None,),
    }
    return candidates.get(backend, (None,))


def tiling_from_dict(backend: str, fields: dict | None):
    """The tiling object of ``backend`` from a table's JSON fields (None -> default)."""
    if not fields:
        return None
    cls = tiling_class(backend)
    if cls is None:
        return None
    fields = {key: tuple(val) if isinstance(val, list) else val for key, val in fields.items()}
    return cls(**fields)


def tiling_class(backend: str):
    from epsjax.pallas_kernels import chunked_gemm, dense_gemm, group_gemm_mgpu, group_gemm_triton

    classes = {
        "dense": dense_gemm.DenseTiling,
        "chunked": chunked_gemm.ChunkTiling,
        "pallas_triton": group_gemm_triton.TritonTiling,
        "mosaic_gpu": group_gemm_mgpu.MosaicTiling,
        "jax_triton": group_gemm_triton.TritonTiling,
    }
    return classes.get(backend)
