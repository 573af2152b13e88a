"""GPU targets: what to build for, on a machine with or without the GPU.

Two things live here:

* **The device a program is built for.**  :func:`current` answers "which platform and device kind is this
  program being traced for?": the abstract device of the mesh in context (``jax.set_mesh(mesh)`` or the body
  of a ``jax.shard_map``) when there is one, else the default device.  The selector and the kernel backends
  ask it instead of ``jax.devices()[0]``, so tracing under a mesh of compile-only GPU devices picks and
  builds the GPU kernels on a CPU-only machine without any patch.
* **Compile-only GPU devices.**  ``jax.experimental.topologies.get_topology_desc`` with a
  ``GpuTargetConfigProto`` gives devices that XLA:GPU compiles for but cannot run on; with the CUDA plugin
  wheels (the ``aot`` extra) and a CUDA toolkit's ``ptxas`` on this machine, ``jit(f).lower(...).compile()``
  then runs XLA:GPU's real pipeline (fusion, the latency-hiding scheduler, Mosaic GPU and Triton, ptxas).
  :data:`TARGETS` holds the device facts of the Hopper parts we build for, written from NVIDIA's published
  specifications (SM count, memory, bandwidth, L2, shared memory per SM and block, registers); the proto
  layout follows openxla/xla's ``xla/backends/gpu/target_config/specs/*.txtpb``.  The per-dtype rate tables
  of those specs are left out: XLA's cost model falls back to its defaults, and without a device it has no
  autotuning results either, so fusion and GEMM choices may differ from a real GPU's.

:func:`ptxas_report` reads what ptxas prints with ``-v`` (registers, spills, serialized wgmma per kernel);
:func:`capture_native_output` collects that text, which the compilers write straight to file descriptors 1
and 2.  ``scripts/aot_check.py`` uses both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import tempfile

import jax

from epsjax.pallas_kernels.errors import KernelError


@dataclasses.dataclass(frozen=True)
class GpuTarget:
    """The facts of one GPU model that XLA:GPU and the kernels need to build for it (per GPU)."""

    name: str
    device_kind: str               # what jax reports as device_kind
    compute_capability: tuple[int, int]
    sm_count: int
    memory_bytes: int
    memory_bandwidth: float        # bytes/s (HBM datasheet rate)
    l2_bytes: int
    clock_ghz: float               # boost clock
    memory_clock_khz: int
    nvlink_links: int
    source: str

    # Per-SM limits shared by every sm_90 part.
    shared_memory_per_sm: int = 233472          # 228 KiB
    shared_memory_per_block_optin: int = 232448  # 227 KiB
    registers_per_sm: int = 65536
    max_threads_per_sm: int = 2048

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}a" if major >= 9 else f"sm_{major}{minor}"

    @property
    def compute_capability_int(self) -> int:
        """The ``major * 10 + minor`` form triton and jax-triton take."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]


_HOPPER_SOURCE = ("NVIDIA H100 Tensor Core GPU Architecture whitepaper (132 SMs on SXM5, 50 MB L2, 228 KB shared "
                  "memory per SM, 227 KB per block, 64K registers per SM); ")
TARGETS: dict[str, GpuTarget] = {
    target.name: target for target in (
        GpuTarget("h100", "NVIDIA H100 80GB HBM3", (9, 0), 132, 80 * 2**30, 3.35e12, 50 * 2**20, 1.98, 2619000,
                  18, _HOPPER_SOURCE + "H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 18 NVLink 4 links"),
        GpuTarget("h800", "NVIDIA H800", (9, 0), 132, 80 * 2**30, 3.35e12, 50 * 2**20, 1.98, 2619000, 8,
                  _HOPPER_SOURCE + "H800 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, NVLink 400 GB/s (8 links)"),
        GpuTarget("h200", "NVIDIA H200", (9, 0), 132, 141 * 10**9, 4.8e12, 50 * 2**20, 1.98, 3201000, 18,
                  _HOPPER_SOURCE + "H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 18 NVLink 4 links"),
        GpuTarget("h20", "NVIDIA H20", (9, 0), 78, 96 * 10**9, 4.0e12, 60 * 2**20, 1.98, 2619000, 18,
                  "NVIDIA H20 product brief: 78 SMs, 96 GB HBM3, 4.0 TB/s, 60 MB L2, NVLink 900 GB/s"),
    )
}
HOPPER_KINDS = re.compile(r"H100|H200|H800|H20\b|GH200")


def get_target(name: str) -> GpuTarget:
    if name not in TARGETS:
        raise KernelError(f"unknown GPU target {name!r}; known: {sorted(TARGETS)}")
    return TARGETS[name]


def target_for_kind(device_kind: str) -> GpuTarget | None:
    """The target whose device kind ``device_kind`` names (longest name first: "H200" before "H20")."""
    for target in sorted(TARGETS.values(), key=lambda t: -len(t.name)):
        if re.search(rf"\b{target.name}\b", device_kind, re.I):
            return target
    return None


def target_config(target: GpuTarget | str) -> str:
    """The ``GpuTargetConfigProto`` text of a target (what ``get_topology_desc(target_config=...)`` reads)."""
    t = get_target(target) if isinstance(target, str) else target
    major, minor = t.compute_capability
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {t.shared_memory_per_sm}
  threads_per_core_limit: {t.max_threads_per_sm}
  core_count: {t.sm_count}
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(t.memory_bandwidth)}
  l2_cache_size: {t.l2_bytes}
  clock_rate_ghz: {t.clock_ghz}
  device_memory_size: {t.memory_bytes}
  shared_memory_per_block_optin: {t.shared_memory_per_block_optin}
  cuda_compute_capability {{
    major: {major}
    minor: {minor}
  }}
  registers_per_core_limit: {t.registers_per_sm}
  registers_per_block_limit: {t.registers_per_sm}
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability {major}.{minor}a"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  name: "{t.device_kind}"
  device_interconnect_info {{
    active_links: {t.nvlink_links}
  }}
}}
platform_name: "CUDA"
dnn_version_info {{
  major: 9
  minor: 10
}}
device_description_str: "{t.device_kind}"
"""


def compile_only_devices(target: GpuTarget | str = "h100", count: int = 1) -> list:
    """``count`` compile-only devices of ``target`` (one node). Programs lowered and compiled for them run
    XLA:GPU's pipeline here; they cannot execute. Needs the ``aot`` extra (the CUDA plugin wheels)."""
    t = get_target(target) if isinstance(target, str) else target
    if not isinstance(count, int) or count < 1:
        raise KernelError(f"count must be a positive int, got {count!r}")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check against
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(t.name, "cuda", target_config=target_config(t),
                                                topology=f"1x1x{count}")
    except Exception as e:  # noqa: BLE001 - the plugin's error types are not public
        raise RuntimeError(f"cannot make compile-only {t.name} devices ({e}); they need the CUDA plugin wheels: "
                           "pip install -e '.[aot]'") from e
    return list(topology.devices)


def ptxas_path() -> str | None:
    """The CUDA toolkit's ptxas XLA would use: on PATH, else in /usr/local/cuda/bin."""
    return shutil.which("ptxas") or next((p for p in ("/usr/local/cuda/bin/ptxas",) if os.path.exists(p)), None)


def aot_available() -> str | None:
    """None when compile-only GPU devices can be made here, else why not (one line)."""
    try:
        import jax_plugins.xla_cuda13  # noqa: F401
    except ImportError:
        return "the CUDA plugin is not installed (pip install -e '.[aot]')"
    if ptxas_path() is None:
        return "no ptxas found (a CUDA toolkit's bin/ptxas on PATH or in /usr/local/cuda)"
    return None


# What a program is being built for ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Device:
    """The platform ("cpu", "gpu", ...), device kind and core count a program is traced for."""

    platform: str
    device_kind: str
    num_cores: int | None

    @property
    def is_gpu(self) -> bool:
        return self.platform in ("gpu", "cuda")

    @property
    def is_hopper(self) -> bool:
        return self.is_gpu and HOPPER_KINDS.search(self.device_kind) is not None

    @property
    def compile_only(self) -> bool:
        """Building for a GPU that this process has no runtime for (compile-only devices)."""
        return self.is_gpu and not any(d.platform in ("gpu", "cuda") for d in jax.devices())


def current() -> Device:
    """The device the program being traced is for: the context mesh's abstract device, else the default one."""
    abstract = jax.sharding.get_abstract_mesh().abstract_device
    if abstract is not None:
        return Device(abstract.platform, abstract.device_kind, abstract.num_cores)
    device = jax.devices()[0]
    return Device(device.platform, device.device_kind, getattr(device, "core_count", None))


def is_hopper_kind(device_kind: str) -> bool:
    return HOPPER_KINDS.search(device_kind) is not None


# What ptxas says ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """ptxas -v's account of one entry function."""

    name: str
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    serialized_wgmma: bool     # ptxas C7511: wgmma serialized for lack of registers
    injected_arrives: bool     # ptxas C7519: warpgroup.arrive inserted to use registers in wgmma

    @property
    def spills(self) -> bool:
        return bool(self.spill_store_bytes or self.spill_load_bytes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"spills": self.spills}


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPERTIES = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def ptxas_report(text: str) -> dict[str, KernelResources]:
    """Per entry function, what ``ptxas -v`` printed in ``text`` (the last account of a name wins)."""
    serialized = set(re.findall(r"C7511\).*?function '([^']+)'", text))
    arrives = set(re.findall(r"C7519\).*?function '([^']+)'", text))
    out = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        entry = _ENTRY.search(line)
        if not entry:
            continue
        name = entry.group(1)
        props = regs = None
        for follow in lines[i + 1:i + 8]:
            props = props or _PROPERTIES.search(follow)
            regs = regs or _REGISTERS.search(follow)
            if _ENTRY.search(follow):
                break
        if regs is None:
            continue
        stack, stores, loads = (int(g) for g in props.groups()) if props else (0, 0, 0)
        out[name] = KernelResources(name, int(regs.group(1)), stores, loads, stack, name in serialized,
                                    name in arrives)
    return out


def ptxas_resources(ptx: str, arch: str = "sm_90a") -> dict[str, KernelResources]:
    """Assembles ``ptx`` with ``ptxas -v`` for ``arch`` (output discarded) and returns its report."""
    path = ptxas_path()
    if path is None:
        raise RuntimeError("no ptxas found (a CUDA toolkit's bin/ptxas on PATH or in /usr/local/cuda)")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        done = subprocess.run([path, "-v", f"--gpu-name={arch}", source, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"ptxas failed ({done.returncode}): {done.stderr.strip()[:500]}")
    return ptxas_report(done.stdout + done.stderr)


@contextlib.contextmanager
def capture_native_output():
    """Collects what native code writes to file descriptors 1 and 2 inside the block (ptxas -v reports,
    XLA's C++ logs); yields a list that holds the text once the block exits."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    result: list[str] = []
    with tempfile.TemporaryFile(mode="w+b") as sink:
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield result
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            result.append(sink.read().decode(errors="replace"))
