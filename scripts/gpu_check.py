"""Measure the constants the cost models use and write the device kind's calibration file.

    python scripts/gpu_check.py --cpu              # this machine, 8 virtual CPU devices (about a minute)
    python scripts/gpu_check.py --cpu --quick      # small sizes (the test suite runs this)
    python scripts/gpu_check.py                    # on a lent GPU

Measures, writing the file after each item (an interrupted run keeps what it measured): dense matmul TFLOP/s per
dtype; a streaming copy's memory bandwidth; causal attention's efficiency against that matmul rate; the dispatch
latency of a small program; with more than one device, all_to_all at several sizes, fitted to a fixed cost plus
bytes / bandwidth per device. For each it prints the value the cost model used before (the preset, or the
previous calibration, or none) beside the measurement. The GEMM backends' costs come from the device's profile
table (scripts/profile_gemm.py), which the cost model fits when the device kind is calibrated.

Writes epsjax/scheduler/calibrations/<device kind>.json (--out to write elsewhere) with the host, jax version and
commit. Not yet measured here (issue 14): host<->device copies, ragged_all_to_all, a GEMM beside a collective,
and the compiled kernel tests (run `pytest -m gpu` on a GPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def best_seconds(fn, *args, repeats: int = 5) -> float:
    from epsjax.pallas_kernels.timing import best_seconds as best  # after main() set the platform flags

    return best(fn, *args, repeats=repeats)


def measure_matmul(dtype: str, n: int) -> float:
    """TFLOP/s of one [n, n] x [n, n] matmul (float32 accumulation)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32).astype(x.dtype))
    return 2 * n ** 3 / best_seconds(f, a, b) / 1e12


def measure_memory(mib: int) -> float:
    """GB/s of a streaming read + write (x * 2 over an array of `mib` MiB, float32)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((mib * 2 ** 20 // 4,), jnp.float32)
    return 2 * x.nbytes / best_seconds(jax.jit(lambda v: v * 2), x) / 1e9


def measure_host_to_device(mib: int) -> float:
    """GB/s of copying a page-locked-if-possible host array of `mib` MiB to the device (jax.device_put): what an
    offloaded expert's load costs. On CPU it is a host memcpy into a new buffer."""
    import jax
    import numpy as np

    host = np.ones((mib * 2 ** 20 // 4,), np.float32)
    device = jax.devices()[0]
    return host.nbytes / best_seconds(lambda h: jax.device_put(h, device), host) / 1e9


def measure_attention(seq: int, heads: int, head_dim: int, matmul_tflops: float) -> float:
    """Causal softmax attention (the model's prefill core) as a fraction of the measured matmul rate."""
    import jax
    import jax.numpy as jnp

    q, k, v = (jax.random.normal(jax.random.key(i), (heads, seq, head_dim), jnp.float32) for i in range(3))

    def attention(q, k, v):
        s = jnp.einsum("hqd,hkd->hqk", q, k) / head_dim ** 0.5
        s = jnp.where(jnp.tril(jnp.ones((seq, seq), bool)), s, -jnp.inf)
        return jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(s, axis=-1), v)

    flops = 2 * 2 * heads * seq * seq * head_dim / 2  # QK^T and PV over the causal half
    return flops / best_seconds(jax.jit(attention), q, k, v) / 1e12 / matmul_tflops


def measure_dispatch() -> float:
    """Seconds to run one tiny compiled program (launch + dispatch overhead)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((8,), jnp.float32)
    return best_seconds(jax.jit(lambda v: v + 1), x, repeats=50)


def measure_all_to_all(sizes_kib) -> tuple[float, float, list]:
    """(GB/s per device, fixed seconds, points) of jax.lax.all_to_all over every device, fitted to
    t = latency + bytes sent per device / bandwidth by least squares on (size, best time)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, PartitionSpec as P

    devices = jax.devices()
    p = len(devices)
    mesh = Mesh(np.array(devices), ("x",))
    points = []
    for kib in sizes_kib:
        rows = max(p, kib * 1024 // (4 * 256) // p * p)  # [rows, 256] float32 per device
        x = jnp.ones((p * rows, 256), jnp.float32)
        f = jax.jit(jax.shard_map(lambda v: jax.lax.all_to_all(v, "x", 0, 0, tiled=True), mesh=mesh,
                                  in_specs=P("x"), out_specs=P("x")))
        sent = rows * 256 * 4 * (p - 1) / p  # bytes each device sends to the others
        points.append((sent, best_seconds(f, x)))
    a = np.array([[1.0, s] for s, _ in points])
    b = np.array([t for _, t in points])
    (latency, per_byte), *_ = np.linalg.lstsq(a, b, rcond=None)
    per_byte = max(per_byte, 1e-15)
    return 1 / per_byte / 1e9, max(float(latency), 0.0), [dict(bytes_per_device=s, seconds=t) for s, t in points]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="calibrate this machine's CPU (8 virtual devices)")
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds, for the test suite")
    parser.add_argument("--out", default=None, help="calibration directory (default epsjax/scheduler/calibrations)")
    args = parser.parse_args(argv)
    if args.cpu:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    sys.path.insert(0, str(ROOT))
    from epsjax.host_memory import keep_freed_memory

    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    import jax
    import jax.numpy as jnp

    from epsjax.provenance import git_commit
    from epsjax.scheduler import calibration
    from epsjax.scheduler.hardware import hardware_for_device_kind

    kind = jax.devices()[0].device_kind
    directory = pathlib.Path(args.out) if args.out else calibration.CALIBRATION_DIR
    directory.mkdir(parents=True, exist_ok=True)
    path = calibration.calibration_path(kind, directory)
    before = hardware_for_device_kind(kind, directory)  # the model's numbers before this run
    cal = dict(device_kind=kind, platform=jax.devices()[0].platform, devices=len(jax.devices()),
               cores=os.cpu_count() if args.cpu else (getattr(jax.devices()[0], "core_count", None) or 1),
               memory_gb=(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30 if args.cpu
                          else (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2 ** 30),
               host=platform.node(), jax_version=jax.__version__, commit=git_commit(),
               created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               command="scripts/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               quick=args.quick, dense_tflops={})

    def save():
        path.write_text(json.dumps(cal, indent=1))

    def report(what, measured, unit, previous):
        prior = "none" if previous is None else f"{previous:.4g} {unit}"
        print(f"{what:34s} measured {measured:10.4g} {unit:8s} model before: {prior}")

    n = 512 if args.quick else (1024 if args.cpu else 8192)
    for dtype in ("float32", "bfloat16"):
        rate = measure_matmul(jnp.dtype(dtype), n)
        cal["dense_tflops"][dtype] = rate
        report(f"dense matmul {dtype} {n}^3", rate, "TFLOP/s",
               None if before is None else before.peak_flops(dtype) / 1e12 * before.dense_gemm_efficiency)
        save()
    cal["dense_tflops"]["float16"] = cal["dense_tflops"]["bfloat16"]
    cal["memory_gbs"] = measure_memory(16 if args.quick else 256)
    report("streaming copy", cal["memory_gbs"], "GB/s",
           None if before is None else before.hbm_gbs * before.hbm_efficiency)
    save()
    cal["host_to_device_gbs"] = measure_host_to_device(16 if args.quick else 256)
    report("host -> device copy", cal["host_to_device_gbs"], "GB/s",
           None if before is None else before.pcie_per_direction * before.link_efficiency / 1e9)
    save()
    cal["attention_efficiency"] = measure_attention(256 if args.quick else 1024, 4 if args.quick else 8, 64,
                                                    cal["dense_tflops"]["float32"])
    report("causal attention / matmul rate", cal["attention_efficiency"], "", None if before is None else
           before.attention_efficiency)
    save()
    cal["dispatch_latency_s"] = measure_dispatch()
    report("dispatch of a tiny program", cal["dispatch_latency_s"] * 1e6, "us",
           None if before is None else before.kernel_latency_s * 1e6)
    save()
    if len(jax.devices()) > 1:
        sizes = (16, 256, 1024) if args.quick else (64, 512, 4096, 16384)
        gbs, latency, points = measure_all_to_all(sizes)
        cal.update(link_gbs=gbs, link_latency_s=latency, all_to_all_points=points)
        prev_bw = None if before is None else before.intra_node_per_direction * before.link_efficiency / 1e9
        report(f"all_to_all over {len(jax.devices())} devices", gbs, "GB/s", prev_bw)
        report("  fixed cost", latency * 1e6, "us", None if before is None else before.intra_node_latency * 1e6)
    else:
        cal.update(link_gbs=0.0, link_latency_s=0.0)
    save()
    print(f"wrote {path}: {calibration.describe(calibration.load_calibration(kind, directory))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
