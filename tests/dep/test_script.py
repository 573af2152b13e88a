"""scripts/simulate_findep.py runs (two settings, no sweep) and writes its table, JSON, charts and traces."""

import importlib.util
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_simulate_findep_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("simulate_findep", ROOT / "scripts" / "simulate_findep.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["simulate_findep"] = module
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--out-dir", str(tmp_path), "--max-r", "4"])
    assert "FinDEP" in capsys.readouterr().out
    saved = json.loads((tmp_path / "findep_simulation.json").read_text())
    assert len(saved["settings"]) == len(out["settings"]) == 2
    for setting in saved["settings"]:
        rows = setting["schedules"]
        # FinDEP's space holds PPPipe's and the naive plan: with the cost models (not the fits it optimised) it
        # may only lose by the fit error.
        assert rows["findep"]["tokens_per_s"] >= 0.99 * rows["pppipe"]["tokens_per_s"]
        assert rows["pppipe"]["tokens_per_s"] >= 0.99 * rows["pingpong"]["tokens_per_s"]
        assert rows["pingpong"]["tokens_per_s"] > rows["naive"]["tokens_per_s"]
        assert rows["findep"]["solve_ms"] < 100
        key = module.Setting(**setting["setting"]).key
        assert (tmp_path / f"findep_{key}.png").stat().st_size > 10_000
        assert set(json.loads((tmp_path / f"findep_{key}.trace.json").read_text())) == set(module.SCHEDULES)


def test_simulate_findep_workloads_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("simulate_findep_workloads",
                                                  ROOT / "scripts" / "simulate_findep_workloads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--quick", "--out-dir", str(tmp_path)])
    assert "TTFT-bound prefill" in capsys.readouterr().out
    saved = json.loads((tmp_path / "findep_workloads.json").read_text())
    assert all(len(saved[k]) == len(out[k]) for k in ("prefill", "ttft", "decode", "skew"))
    # Two settings: b = 1, 2; one budget; decode b = 16 and the memory's largest; Zipf 0 and 1.2 x (prefill, decode).
    assert len(saved["prefill"]) == 4 and len(saved["ttft"]) == 2 and len(saved["skew"]) == 2 * 2 * 2
    # Each space holds the next one's plans and every plan is scored by the same exact step time: FinDEP is never
    # slower than FinDEP without segmented A2E, than tuned PPPipe, than the ping-pong rule's PPPipe plan.
    for row in saved["prefill"] + saved["decode"] + saved["skew"]:
        steps = [row[k]["step_s"] for k in ("findep", "findep_whole", "pppipe", "rule")]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(steps, steps[1:])), row
    for row in saved["ttft"]:
        sizes = [row[k]["sequences"] for k in ("findep", "findep_whole", "pppipe", "rule")]
        assert sizes == sorted(sizes, reverse=True), row
    assert (tmp_path / "findep_workloads.png").stat().st_size > 10_000
    assert "| FinDEP plan |" in (tmp_path / "findep_workloads.md").read_text()
