"""Profile the expert GEMM backends and regenerate the selector's table.

Sweeps tokens per expert (decode sizes to 16K) x balanced / skewed loads at
the MoE shapes of DeepSeek-V2, Mixtral, DBRX, Arctic and Qwen3-30B-A3B, over
every backend that runs natively on this device plus lax.ragged_dot, tokamax (and
torch._grouped_mm as a peer when torch with CUDA imports).  Reports TFLOP/s
and the fraction of the measured dense-matmul peak, writes
``scripts/results/gemm_<device>.json`` and a PNG plot (TFLOP/s vs tokens per
expert, one line per backend, the dense peak as a line), and rewrites
``pallas_kernels/profiles/<device>.json``, the table ``select_backend`` reads.

    .venv/bin/python scripts/profile_gemm.py --quick     # CPU: small shapes, minutes
    .venv/bin/python scripts/profile_gemm.py             # GPU: the full sweep

``--quick`` scales every shape down (K, N / 8; E / 8) and sweeps 1..256 tokens
per expert, so the CPU run finishes in minutes.  Interpret-mode kernels are
never timed (they are simulations, not fast paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform as platform_lib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epsjax import pallas_kernels as pk  # noqa: E402
from epsjax.host_memory import keep_freed_memory  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402
from epsjax.pallas_kernels import group_gemm_jax_triton, group_gemm_mgpu, selector, tokamax_gemm  # noqa: E402
from epsjax.pallas_kernels.timing import best_seconds  # noqa: E402


@dataclasses.dataclass(frozen=True)
class MoeShape:
    name: str
    d: int  # model dim: K of the first projection
    f: int  # expert FFN dim: N of the first projection
    experts: int
    top_k: int


SHAPES = (
    MoeShape("deepseek-v2", 5120, 1536, 160, 6),
    MoeShape("mixtral-8x7b", 4096, 14336, 8, 2),
    MoeShape("dbrx", 6144, 10752, 16, 4),
    MoeShape("arctic", 7168, 4864, 128, 2),
    MoeShape("qwen3-30b-a3b", 2048, 768, 128, 8),
)
# --cpu: the expert shapes of the mid-size models a CPU serves (those of scripts/bench_vs_transformers.py), from
# decode (a fraction of a token per expert) to prefill loads.
CPU_SHAPES = (
    MoeShape("mixtral-mid", 1024, 3584, 8, 2),
    MoeShape("qwen3-moe-mid", 1024, 384, 64, 8),
    MoeShape("deepseek-v2-mid", 1024, 384, 32, 6),
)
GPU_TOKENS = (1, 4, 16, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)
QUICK_TOKENS = (1, 8, 64, 256)
CPU_TOKENS = (0.125, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def quick_shape(shape: MoeShape) -> MoeShape:
    return dataclasses.replace(shape, d=max(64, shape.d // 8), f=max(64, shape.f // 8),
                               experts=max(4, shape.experts // 8))


def group_sizes(load: str, tokens_per_expert: float, experts: int, seed: int = 0) -> np.ndarray:
    """Balanced: every expert gets the mean (below one token per expert: one row each for a random subset, as
    at decode).  Skewed: Dirichlet(0.3) shares of the same total."""
    total = max(1, round(tokens_per_expert * experts))
    if load == "balanced":
        if tokens_per_expert < 1:
            sizes = np.zeros(experts, np.int32)
            sizes[np.random.default_rng(seed).choice(experts, total, replace=False)] = 1
            return sizes
        return np.full(experts, int(tokens_per_expert), np.int32)
    shares = np.random.default_rng(seed).dirichlet(np.full(experts, 0.3))
    sizes = np.floor(shares * total).astype(np.int32)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return sizes


def dense_peak(m: int, k: int, n: int, dtype, repeats: int) -> float:
    """TFLOP/s of one plain [M, K] x [K, N] matmul through XLA: the device's dense path.

    A grouped GEMM of M rows does the same work, so this is its ceiling at this M;
    the shape's peak is the best of these over the sweep.
    """
    a = jnp.ones((m, k), dtype)
    b = jnp.ones((k, n), dtype)
    seconds = best_seconds(jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(dtype)),
                          a, b, repeats=repeats)
    return 2 * m * k * n / seconds / 1e12


def torch_grouped_mm(lhs, rhs, sizes, repeats: int) -> float | None:
    """Seconds of torch._grouped_mm on the same problem, or None without torch + CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not hasattr(torch, "_grouped_mm"):
        return None
    a = torch.randn(lhs.shape, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(rhs.shape, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor(np.cumsum(sizes), device="cuda", dtype=torch.int32)
    torch._grouped_mm(a, b, offs=offs)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch._grouped_mm(a, b, offs=offs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def backends_here(plat: str, kind: str) -> list[str]:
    names = ["dense", "ragged_dot"]
    if plat == "cpu":
        return names + ["chunked"]
    names.append("pallas_triton")
    if any(h in kind for h in ("H100", "H200", "H800", "GH200")):
        names.append("mosaic_gpu")
    if group_gemm_jax_triton.importable():
        names.append("jax_triton")
    if tokamax_gemm.importable():
        names.append("tokamax")  # openxla/tokamax's ragged_dot: a peer, and a backend the table can select
    return names


def run_point(op, backend, tilings, operands, sizes, repeats):
    """(best seconds, best tiling) over the candidate tilings; (None, None) when none runs."""
    best = (None, None)
    for tiling in tilings:
        if backend == "mosaic_gpu" and not group_gemm_mgpu.supports(operands[0].dtype, operands[1].shape[1],
                                                                     operands[1].shape[2], tiling, op=op):
            continue
        fn = getattr(pk, op)
        jitted = jax.jit(lambda *args, t=tiling: fn(*args, backend=backend, tiling=t))
        try:
            seconds = best_seconds(jitted, *operands, jnp.asarray(sizes), repeats=repeats)
        except Exception as err:  # a tiling that does not compile for this shape is skipped, with a note
            tqdm.write(f"  {backend} {tiling}: {type(err).__name__}: {str(err)[:120]}")
            continue
        if best[0] is None or seconds < best[0]:
            best = (seconds, tiling)
    return best


def make_operands(op, m, shape, dtype, key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    x = jax.random.normal(k1, (m, shape.d), dtype)
    w = (jax.random.normal(k2, (shape.experts, shape.d, shape.f), dtype) / np.sqrt(shape.d)).astype(dtype)
    if op == "group_gemm":
        return (x, w)
    w_up = (jax.random.normal(k3, w.shape, dtype) / np.sqrt(shape.d)).astype(dtype)
    w_down = (jax.random.normal(k4, (shape.experts, shape.f, shape.d), dtype) / np.sqrt(shape.f)).astype(dtype)
    return (x, w, w_up, w_down)


def tiling_json(tiling):
    return None if tiling is None else {k: list(v) if isinstance(v, tuple) else v
                                        for k, v in dataclasses.asdict(tiling).items()}




def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform_lib.processor() or "unknown"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({(r["model"], r["op"], r["dtype"]) for r in results["entries"]})
    fig, axes = plt.subplots(len(shapes), 1, figsize=(8, 3.2 * len(shapes)), squeeze=False)
    for ax, (model, op, dtype) in zip(axes[:, 0], shapes):
        rows = [r for r in results["entries"] if r["model"] == model and r["op"] == op and r["dtype"] == dtype]
        for backend, load in sorted({(r["backend"], r["load"]) for r in rows}):
            pts = sorted((r["tokens_per_expert"], r["tflops"]) for r in rows if r["backend"] == backend and r["load"] == load)
            ax.plot(*zip(*pts), marker="o", linestyle="-" if load == "balanced" else "--", label=f"{backend} ({load})")
        dense = sorted({(r["tokens_per_expert"], r["dense_same_m_tflops"]) for r in rows if r["load"] == "balanced"})
        if dense:
            ax.plot(*zip(*dense), color="gray", linestyle=":", label="dense matmul, same M")
        peak = rows[0]["dense_peak_tflops"]
        ax.axhline(peak, color="black", linewidth=1, label=f"dense matmul peak {peak:.3g}")
        r0 = rows[0]
        ax.set_title(f"{model} {op}: E={r0['E']} K={r0['K']} N={r0['N']} {r0['dtype']} on {results['device_kind']}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per expert")
        ax.set_ylabel("TFLOP/s")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and token counts (CPU check)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU table: mid-size expert shapes, decode to prefill loads, float32 and bfloat16, "
                             "expert_ffn, the CPU backends")
    parser.add_argument("--models", nargs="*", default=[s.name for s in SHAPES])
    parser.add_argument("--ops", nargs="*", default=["group_gemm", "expert_ffn"])
    parser.add_argument("--dtype", default=None, help="comma-separated (default: bfloat16; --cpu: float32,bfloat16)")
    parser.add_argument("--tokens", nargs="*", type=float, help="tokens per expert to sweep")
    parser.add_argument("--backends", nargs="*", help="default: every backend that runs natively here")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--max-rows", type=int, default=1 << 20, help="skip points with more rows (memory)")
    parser.add_argument("--out-dir", default=str(ROOT / "scripts" / "results"))
    parser.add_argument("--table", default=None, help="selector table path (default: pallas_kernels/profiles/<device>.json)")
    parser.add_argument("--no-table", action="store_true", help="do not rewrite the selector table")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    kind, plat = device.device_kind, device.platform
    dtypes = [jnp.dtype(d) for d in (args.dtype or ("float32,bfloat16" if args.cpu else "bfloat16")).split(",")]
    tokens = tuple(args.tokens or (QUICK_TOKENS if args.quick else CPU_TOKENS if args.cpu else GPU_TOKENS))
    repeats = args.repeats or (5 if plat == "cpu" else 20)
    backends = args.backends or [b for b in backends_here(plat, kind) if not (args.cpu and b == "ragged_dot")]
    if args.cpu:
        shapes, ops = list(CPU_SHAPES), ["expert_ffn"]
    else:
        shapes = [quick_shape(s) if args.quick else s for s in SHAPES if s.name in args.models]
        ops = args.ops
    points = [(op, s, t, load, dtype) for dtype in dtypes for op in ops for s in shapes for t in tokens
              for load in ("balanced", "skewed") if t * s.experts <= args.max_rows]

    results = {
        "device_kind": kind, "platform": plat, "is_cpu": plat == "cpu",
        "cpu_model": cpu_model() if plat == "cpu" else None, "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["scripts/profile_gemm.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "dtypes": [d.name for d in dtypes], "entries": [], "peers": [],
    }
    dense_at_m = {}  # (K, N, M) -> TFLOP/s of one plain [M, K] x [K, N] matmul
    key = jax.random.key(0)
    for op, shape, tpe, load, dtype in tqdm(points, desc=f"profile {kind}", unit="point"):
        sizes = group_sizes(load, tpe, shape.experts)
        m = int(sizes.sum())
        if (shape.d, shape.f, m, dtype.name) not in dense_at_m:
            dense_at_m[(shape.d, shape.f, m, dtype.name)] = dense_peak(m, shape.d, shape.f, dtype, repeats)
        operands = make_operands(op, m, shape, dtype, key)
        flops = 2 * m * shape.d * shape.f * (3 if op == "expert_ffn" else 1)
        for backend in backends:
            seconds, tiling = run_point(op, backend, selector.candidate_tilings(backend), operands, sizes, repeats)
            if seconds is None:
                continue
            tflops = flops / seconds / 1e12
            results["entries"].append(dict(
                op=op, model=shape.name, E=shape.experts, K=shape.d, N=shape.f, dtype=dtype.name, load=load,
                tokens_per_expert=tpe, max_tokens_per_expert=int(sizes.max()), backend=backend,
                tiling=tiling_json(tiling), seconds=seconds, tflops=tflops,
                dense_same_m_tflops=dense_at_m[(shape.d, shape.f, m, dtype.name)]))
        if op == "group_gemm" and plat == "gpu":
            peer = torch_grouped_mm(operands[0], operands[1], sizes, repeats)
            if peer is not None:
                results["peers"].append(dict(peer="torch._grouped_mm", model=shape.name, load=load, tokens_per_expert=tpe,
                                             seconds=peer, tflops=flops / peer / 1e12))

    # The dense peak of a shape: the best plain matmul over the sweep's sizes (same K, N, dtype).
    for e in results["entries"]:
        peak = max(v for (k, n, _, dt), v in dense_at_m.items() if (k, n, dt) == (e["K"], e["N"], e["dtype"]))
        e["dense_peak_tflops"] = peak
        e["peak_fraction"] = e["tflops"] / peak
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"gemm_{selector.table_name(kind)}{'_quick' if args.quick else ''}"
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / f"{stem}.png")
    print(f"wrote {out_dir / stem}.json and .png")
    summarize(results)
    if not args.no_table:
        table_path = pathlib.Path(args.table) if args.table else selector.PROFILE_DIR / f"{selector.table_name(kind)}.json"
        write_table(results, table_path)
        print(f"wrote selector table {table_path}")


def write_table(results, path):
    """The selector's table: the measured entries plus where they came from."""
    table = {key: results[key] for key in ("device_kind", "platform", "is_cpu", "cpu_model", "cpu_count",
                                           "jax_version", "commit", "created", "command", "quick")}
    table["note"] = ("measured by scripts/profile_gemm.py on this device kind; "
                     + ("a CPU table (XLA:CPU timings), not GPU numbers" if results["is_cpu"] else "GPU timings"))
    table["entries"] = [{k: e[k] for k in ("op", "model", "E", "K", "N", "dtype", "load", "tokens_per_expert",
                                           "max_tokens_per_expert", "backend", "tiling", "seconds", "tflops",
                                           "peak_fraction")} for e in results["entries"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")


def summarize(results):
    """The winner per point, printed as a table."""
    by_point = {}
    for e in results["entries"]:
        by_point.setdefault((e["op"], e["model"], e["dtype"], e["load"], e["tokens_per_expert"]), []).append(e)
    print(f"{'op':11s} {'model':16s} {'dtype':9s} {'load':9s} {'tok/exp':>7s}  winner       TFLOP/s  peak%   others")
    for (op, model, dtype, load, tpe), rows in sorted(by_point.items()):
        rows.sort(key=lambda e: e["seconds"])
        best = rows[0]
        others = " ".join(f"{e['backend']}={e['tflops']:.3g}" for e in rows[1:])
        print(f"{op:11s} {model:16s} {dtype:9s} {load:9s} {tpe:7g}  {best['backend']:12s} {best['tflops']:7.3g} "
              f"{100 * best['peak_fraction']:5.1f}%  {others}")


if __name__ == "__main__":
    main()
