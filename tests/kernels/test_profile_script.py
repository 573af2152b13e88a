"""scripts/profile_gemm.py runs on CPU and writes results, a plot and a loadable table."""

import importlib.util
import json
import pathlib
import sys

from epsjax.pallas_kernels import selector

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "profile_gemm.py"


def test_quick_profile_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_gemm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    table = tmp_path / "table.json"
    module.main(["--quick", "--models", "qwen3-30b-a3b", "--tokens", "2", "--ops", "group_gemm",
                 "--repeats", "1", "--out-dir", str(tmp_path), "--table", str(table)])
    results = json.loads((tmp_path / "gemm_cpu_quick.json").read_text())
    assert results["is_cpu"] and results["jax_version"] and results["commit"]
    assert {e["backend"] for e in results["entries"]} == {"dense", "chunked", "ragged_dot"}
    assert all(0 < e["peak_fraction"] and e["tflops"] > 0 for e in results["entries"])
    assert (tmp_path / "gemm_cpu_quick.png").stat().st_size > 0
    written = json.loads(table.read_text())
    assert written["is_cpu"] and written["entries"]
    for entry in written["entries"]:
        selector.tiling_from_dict(entry["backend"], entry["tiling"])
