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
