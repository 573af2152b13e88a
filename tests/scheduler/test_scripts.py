"""scripts/simulate_eps.py runs end to end; scripts/validate_cost_model.py's plumbing runs on CPU."""

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_simulate_eps(tmp_path, capsys):
    out = load_script("simulate_eps").main(["--out-dir", str(tmp_path), "--tokens-per-gpu", "2048"])
    printed = capsys.readouterr().out
    assert "deepseek-v2" in printed and "121.8K" in printed and "preset roofline" in printed
    data = json.loads((tmp_path / "simulate_eps.json").read_text())
    assert data == json.loads(json.dumps(out))
    labels = [r["label"] for r in data["results"]]
    assert labels[:4] == ["deepseek-v2", "mixtral-8x7b", "dbrx", "arctic"]
    for r in data["results"]:
        sim = r["simulated_tokens_per_s"]
        assert 0 < sim["tp_tp"] and 0 < sim["ep"] <= sim["eps"] * (1 + 1e-9)
        assert (tmp_path / r["files"]["gantt"]).read_bytes()[:4] == b"\x89PNG"
        assert json.loads((tmp_path / r["files"]["trace"]).read_text())["traceEvents"]
        assert r["cost_sources"]["gemm:dense"]
        band = r["bands"]  # +/-20% of every uncalibrated constant, re-planned: the headline lies inside its band
        lo, hi = band["eps_tokens_per_s"]
        assert lo <= r["simulated_tokens_per_s"]["eps"] * (1 + 1e-9) and hi >= r["simulated_tokens_per_s"]["eps"] * (
            1 - 1e-9) and lo < hi
        assert len(band["perturbed"]) == 18 and band["skewed_zipf"]["eps_tokens_per_s"] > 0
    ds = data["results"][0]
    assert ds["paper_tokens_per_s"] == {"baseline": 100.0e3, "eps": 121.8e3,
                                        "baseline_is": ds["paper_tokens_per_s"]["baseline_is"]}


def test_validate_cost_model_plumbing(tmp_path):
    """On CPU only the plumbing is checked: the prediction formula and one tiny measured case."""
    module = load_script("validate_cost_model")
    from epsjax.scheduler import CostModel
    from epsjax.models.config import get_preset

    sizes = module.group_sizes("skewed", 64, 8)
    assert sizes.sum() == 512 and sizes.max() > 64
    assert np.array_equal(module.group_sizes("balanced", 64, 8), np.full(8, 64))
    cfg = get_preset("deepseek-v2")
    costs = CostModel.build("h100", use_profiles=False)
    t = module.predict(costs, cfg, np.full(20, 2048), "mosaic_gpu")
    ffn = costs.gemm_model("mosaic_gpu").ffn_time(np.full(20, 2048), 5120, 1536)
    assert ffn < t < 1.5 * ffn
    with pytest.raises(SystemExit, match="GPU"):
        module.main(["--tiny"])
    out = module.main(["--hardware", "h100", "--tiny", "--allow-cpu", "--backends", "dense", "--tokens", "8",
                       "--loads", "balanced", "--out", str(tmp_path / "v.json")])
    assert len(out["rows"]) == 1 and out["note"].startswith("CPU plumbing")
