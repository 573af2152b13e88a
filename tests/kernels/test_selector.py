"""The selector: table lookup, documented fallback rules, and what "auto" may pick."""

import json

import jax.numpy as jnp
import pytest

from epsjax import pallas_kernels as pk
from epsjax.pallas_kernels import selector
from epsjax.pallas_kernels.chunked_gemm import ChunkTiling
from epsjax.pallas_kernels.group_gemm_mgpu import MosaicTiling

CPU_NATIVE = {"dense", "chunked"}
LOADS = [dict(tokens_per_expert=t, max_tokens_per_expert=mx) for t in (0.5, 1, 16, 64, 500, 5000, 20000)
         for mx in (None, 10 * t)]


@pytest.mark.parametrize("kind", ["cpu", "some-other-cpu"])  # the committed table, and the rules
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("op", ["group_gemm", "expert_ffn"])
def test_cpu_never_picks_interpreted_gpu_or_ragged(kind, dtype, op):
    for load in LOADS:
        for e, k, n in ((4, 24, 40), (16, 256, 96), (160, 5120, 1536)):
            choice = selector.select_backend(**load, num_experts=e, k=k, n=n, dtype=dtype, op=op, kind=kind, plat="cpu")
            assert choice.backend in CPU_NATIVE, (load, e, k, n, choice)


def test_cpu_rules():
    rule = lambda **kw: selector.select_backend(num_experts=8, k=64, n=64, kind="x-cpu", plat="cpu", **kw)
    assert rule(tokens_per_expert=128, dtype=jnp.bfloat16).backend == "dense"
    assert rule(tokens_per_expert=8, dtype=jnp.bfloat16).backend == "chunked"
    assert rule(tokens_per_expert=128, max_tokens_per_expert=1000, dtype=jnp.bfloat16).backend == "chunked"
    assert rule(tokens_per_expert=128, dtype=jnp.float32).backend == "dense"
    assert rule(tokens_per_expert=16, dtype=jnp.float32).backend == "chunked"
    assert "fallback rule" in rule(tokens_per_expert=8, dtype=jnp.float32).reason


@pytest.mark.parametrize("tpe,kind,dtype,k,n,expected", [
    (64, "NVIDIA H100 80GB HBM3", "bfloat16", 5120, 1536, "mosaic_gpu"),
    (2048, "NVIDIA H200", "bfloat16", 4096, 14336, "mosaic_gpu"),
    (4096, "NVIDIA H100 80GB HBM3", "bfloat16", 4096, 14336, "dense"),  # EPS-MoE crossover
    (64, "NVIDIA H100 80GB HBM3", "bfloat16", 5120, 1000, "pallas_triton"),  # N % 128 != 0
    (64, "NVIDIA A100-SXM4-80GB", "bfloat16", 5120, 1536, "pallas_triton"),
    (64, "NVIDIA H100 80GB HBM3", "float32", 5120, 1536, "ragged_dot"),
    (16384, "NVIDIA A100-SXM4-80GB", "float32", 5120, 1536, "dense"),
])
def test_gpu_rules(tpe, kind, dtype, k, n, expected):
    choice = selector.select_backend(tokens_per_expert=tpe, num_experts=8, k=k, n=n, dtype=dtype,
                                     kind=kind + " (no table)", plat="gpu")
    assert choice.backend == expected, choice


def test_exclude():
    choice = selector.select_backend(tokens_per_expert=8000, num_experts=8, k=64, n=128, dtype="bfloat16",
                                     kind="NVIDIA H100 (no table)", plat="gpu", exclude=("dense",))
    assert choice.backend == "mosaic_gpu"


@pytest.fixture
def fake_tables(tmp_path, monkeypatch):
    def entry(backend, tpe, seconds, load="balanced", e=8, k=1024, n=512, op="group_gemm", tiling=None):
        return dict(op=op, model="m", E=e, K=k, N=n, dtype="bfloat16", load=load, tokens_per_expert=tpe,
                    backend=backend, tiling=tiling, seconds=seconds)

    table = {"device_kind": "Fake GPU 9000", "device_family": "GPU 9000", "platform": "gpu", "is_cpu": False,
             "entries": [
                 entry("mosaic_gpu", 16, 1.0, tiling={"block_m": 64, "block_n": 128, "block_k": 64,
                                                      "max_concurrent_steps": 3, "num_sms": 100}),
                 entry("dense", 16, 2.0),
                 entry("mosaic_gpu", 4096, 3.0),
                 entry("dense", 4096, 2.0),
                 entry("mosaic_gpu", 4096, 1.0, load="skewed"),
                 entry("dense", 4096, 9.0, load="skewed"),
                 entry("chunked", 16, 0.5, e=128, k=2048, n=768, tiling={"chunk": 16}),  # a CPU backend row
             ]}
    monkeypatch.setattr(selector, "PROFILE_DIR", tmp_path)
    selector.load_table.cache_clear()
    (tmp_path / "fake_gpu_9000.json").write_text(json.dumps(table))
    yield
    selector.load_table.cache_clear()


def test_table_lookup(fake_tables):
    pick = lambda **kw: selector.select_backend(num_experts=8, k=1024, n=512, dtype="bfloat16",
                                                 kind="Fake GPU 9000", plat="gpu", **kw)
    choice = pick(tokens_per_expert=20)  # nearest measured: 16
    assert choice.backend == "mosaic_gpu"
    assert choice.tiling == MosaicTiling(64, 128, 64, 3, num_sms=100)
    assert "table" in choice.reason
    assert pick(tokens_per_expert=3000).backend == "dense"  # nearest: 4096 balanced
    assert pick(tokens_per_expert=3000, max_tokens_per_expert=20000).backend == "mosaic_gpu"  # skewed rows
    assert pick(tokens_per_expert=20, op="expert_ffn").backend == "mosaic_gpu"  # falls back to group_gemm rows
    # Family match: another board of the same family reads the same table.
    family = selector.select_backend(tokens_per_expert=20, num_experts=8, k=1024, n=512, dtype="bfloat16",
                                     kind="Acme GPU 9000 PCIe", plat="gpu")
    assert family.backend == "mosaic_gpu"


def test_table_rows_of_unavailable_backends_are_ignored(fake_tables):
    # On a CPU the table's mosaic_gpu rows cannot run: the fastest runnable row wins instead.
    pick = lambda **kw: selector.select_backend(num_experts=8, k=1024, n=512, dtype="bfloat16",
                                                 kind="Fake GPU 9000", plat="cpu", **kw)
    assert pick(tokens_per_expert=20).backend == "dense"  # mosaic_gpu (1.0 s) is faster but GPU-only
    choice = pick(tokens_per_expert=20, exclude=("dense",))  # then only the chunked row of another shape
    assert choice.backend == "chunked" and choice.tiling == ChunkTiling(16)


def test_committed_cpu_table_is_labelled_and_loadable():
    table = selector.load_table("cpu")
    assert table is not None, "pallas_kernels/profiles/cpu.json is missing: run scripts/profile_gemm.py --cpu"
    assert table["is_cpu"] and table["platform"] == "cpu" and table["device_kind"] == "cpu"
    assert "CPU" in table["note"]
    for entry in table["entries"]:
        assert entry["backend"] in CPU_NATIVE | {"ragged_dot"}
        selector.tiling_from_dict(entry["backend"], entry["tiling"])


def test_auto_runs_on_cpu():
    lhs = jnp.ones((64, 32), jnp.bfloat16)
    rhs = jnp.ones((4, 32, 16), jnp.bfloat16)
    out = pk.group_gemm(lhs, rhs, jnp.array([16, 16, 16, 0], jnp.int32))
    assert out.shape == (64, 16) and float(out[0, 0]) == 32 and float(out[-1, 0]) == 0
