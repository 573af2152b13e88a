"""EPS-MoE's prefill setting in simulation: TP+TP, TP/DP+EP without pipeline, and the scheduler's EPS plan.

For each model on H800 nodes (DeepSeek-V2: attention DP + EP on 8 GPUs; Mixtral-8x7B: attention TP + EP on 4;
DBRX and Arctic: attention TP + EP on 8) the script searches the EPS plan, simulates a whole prefill step under
the three strategies, prints the throughputs beside the paper's reported figures and writes

    scripts/results/simulate_eps.json                 every number, the plans, the workload and cost sources
    scripts/results/simulate_eps_<model>.png          Gantt chart of one MoE layer under the chosen plan
    scripts/results/simulate_eps_<model>.trace.json   the same as a Perfetto / Chrome trace

    .venv/bin/python scripts/simulate_eps.py [--tokens-per-gpu 8192] [--seq-len 1024] [--out-dir DIR]

Nothing here is fitted to the paper's throughputs: the cost models come from hardware.py (datasheets plus
stated efficiency assumptions) or from measured GEMM profiles when a table for the device kind exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from epsjax.scheduler import (CostModel, Layout, Plan, Workload, build_layer, gantt, search_plan,  # noqa: E402
                              simulate, simulate_step, write_trace)
from epsjax.scheduler.step import weight_bytes_per_device  # noqa: E402
from epsjax.models.config import get_preset  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    model: str
    devices: int
    attention: str                 # "dp" or "tp" beside EP
    paper_baseline: float | None   # tokens/s reported by EPS-MoE (Table 1)
    paper_eps: float | None
    paper_baseline_is: str
    dtype: str | None = None       # GEMM dtype; None: the model's dtype (bfloat16)
    activation_dtype: str | None = None
    label: str | None = None


# EPS-MoE (arXiv:2410.12247v2) Table 1: DeepSeekV2 and DBRX on 8xH800-80GB SXM, Mixtral 8x7B on 4xH800.
SETTINGS = (
    Setting("deepseek-v2", 8, "dp", 100.0e3, 121.8e3, "DeepSeek's own claim (DeepSeek-V2 paper: FP8 weights)"),
    Setting("mixtral-8x7b", 4, "tp", 71.84e3, 94.89e3, "vLLM (tensor parallel)"),
    Setting("dbrx", 8, "tp", 37.23e3, 56.74e3, "vLLM (tensor parallel)"),
    Setting("arctic", 8, "tp", None, None, "not reported in Table 1"),
    # Sensitivity, not a fit: the DeepSeek-V2 paper (arXiv:2405.04434 sec. 3.2.3) serves the model with FP8
    # parameters. This row runs the GEMMs in FP8 (rate and weight bytes); attention and all-to-all stay bf16.
    Setting("deepseek-v2", 8, "dp", 100.0e3, 121.8e3, "DeepSeek's own claim (DeepSeek-V2 paper: FP8 weights)",
            dtype="float8_e4m3fn", activation_dtype="bfloat16", label="deepseek-v2 (fp8 GEMMs)"),
)

WHY = {
    "deepseek-v2": "Baseline: the 100K figure is DeepSeek's own stack, not a DP+EP run of ours. In bf16 the DP+EP "
                   "weights (~82 GB/GPU, attention replicated) do not even fit an 80 GB H800, and the DeepSeek-V2 "
                   "paper serves FP8 weights: the fp8-GEMM row (same assumptions otherwise) lands ~16-22% above "
                   "both paper figures, the bf16 row ~17-27% below. The dispatch moves one row per (token, device) "
                   "(sharding/ep_moe.py): with one routing group per GPU a token reaches at most topk_group=3 GPUs, "
                   "so the all-to-all is about a fifth of the unpipelined bf16 MoE layer (it was a third when "
                   "every (token, k) assignment travelled), and the pipeline has less to hide: about +11% in bf16, "
                   "+17% with FP8 GEMMs, against the paper's +21.8%.",
    "mixtral-8x7b": "The paper's baseline is vLLM (TP, its fused-MoE Triton kernel); our TP+TP gives every strategy "
                    "the same best modelled kernel, so kernel gains the paper counts are not in our TP+TP -> EPS gain. "
                    "With 2 experts per GPU the MoE all-to-all is under 10% of the EP layer and the attention's TP "
                    "reduce-scatter/all-gather cannot be overlapped in this schedule; reserving SMs for the "
                    "all-to-all costs more GEMM time than it hides, so the search picks asynchronous collectives "
                    "beside the GEMMs (PN=2, no SMs reserved, the GEMMs slowed while they share the GPU): a few "
                    "percent. "
                    "Absolute numbers rest on assumed efficiencies (GEMM 0.70-0.75, attention 0.35), not on "
                    "measurements.",
    "dbrx": "As for Mixtral: our TP+TP lands ~10% below vLLM's 37.2K, the TP -> EP change gives most of our gain, and "
            "the pipeline adds little because all-to-all is ~12% of the EP layer while the attention TP collectives "
            "(~23%) stay exposed. The paper's +52% over vLLM presumably also contains vLLM kernel/all-reduce costs we "
            "do not model.",
    "arctic": "No paper figure in Table 1. Its EP weights (~120 GB/GPU in bf16) exceed 8 x 80 GB, so a real run needs "
              "quantization or more GPUs; simulated anyway. The dense residual MLP overlaps the first dispatch.",
}


def layer_shares(step) -> dict:
    """Per-device milliseconds of one MoE layer by part (collectives counted once)."""
    P = len(step.timeline.schedule.sm_partition)
    collectives = ("dispatch", "combine", "allreduce", "allgather", "reducescatter")
    by = {k: v * 1e3 / (1 if k in collectives else P) for k, v in step.timeline.by_kind().items()}
    return {"layer": step.moe_layer_s * 1e3, "all_to_all": by.get("dispatch", 0) + by.get("combine", 0),
            "tp_collectives": by.get("allreduce", 0) + by.get("allgather", 0) + by.get("reducescatter", 0),
            "expert_gemm": by.get("expert_gemm", 0), "attention": by.get("attention", 0)}


def run_setting(s: Setting, args) -> dict:
    cfg = get_preset(s.model)
    dtype = s.dtype or cfg.dtype
    costs = CostModel.build(args.hardware, dtype, profile_dir=args.profile_dir, activation_dtype=s.activation_dtype)
    ep_layout = Layout.dp_ep(s.devices) if s.attention == "dp" else Layout.tp_ep(s.devices)
    w = Workload(cfg, ep_layout, tokens=args.tokens_per_gpu * s.devices, seq_len=args.seq_len)
    w_tp = w.replace(layout=Layout.tp_tp(s.devices))
    choice = search_plan(w, costs)
    tp_tp = simulate_step(w_tp, costs, Plan(backends=("auto",)))   # the cheapest backend, default tiling
    ep = simulate_step(w, costs, choice.unpipelined_plan)         # PN = 1, nothing reserved, same kernel choice
    eps = simulate_step(w, costs, choice.plan)
    name = s.label or s.model
    stem = args.out_dir / f"simulate_eps_{name.replace(' ', '_').replace('(', '').replace(')', '')}"
    timeline = simulate(build_layer(w, costs, choice.plan))
    files = {}
    if not args.no_png:
        files["gantt"] = str(gantt(timeline, stem.with_suffix(".png"), title=(
            f"{name} {ep_layout.name} on {s.devices}x{costs.hw.name.upper()}: one MoE layer, {choice.plan.describe()}"
            f" - {timeline.makespan * 1e3:.2f} ms (unpipelined {choice.unpipelined_s * 1e3:.2f} ms)")).name)
    files["trace"] = write_trace(timeline, stem.with_suffix(".trace.json")).name  # beside the JSON
    paper_gain = s.paper_eps / s.paper_baseline if s.paper_baseline else None
    return {
        "model": s.model, "label": name, "devices": s.devices, "dtype": dtype, "hardware": costs.hw.name,
        "layouts": {"tp_tp": w_tp.layout.name, "ep": ep_layout.name},
        "tokens_per_step": w.tokens, "seq_len": w.seq_len,
        "weights_gb_per_gpu": {"tp_tp": weight_bytes_per_device(w_tp, costs) / 1e9,
                               "ep": weight_bytes_per_device(w, costs) / 1e9, "hbm_gb": costs.hw.hbm_gb},
        "simulated_tokens_per_s": {"tp_tp": tp_tp.throughput, "ep": ep.throughput, "eps": eps.throughput},
        "simulated_gain_eps_vs_ep": eps.throughput / ep.throughput,
        "simulated_gain_eps_vs_tp_tp": eps.throughput / tp_tp.throughput,
        "paper_tokens_per_s": {"baseline": s.paper_baseline, "eps": s.paper_eps,
                               "baseline_is": s.paper_baseline_is},
        "paper_gain": paper_gain,
        "eps_sim_vs_paper": eps.throughput / s.paper_eps - 1 if s.paper_eps else None,
        "plan": choice.plan.as_dict(), "expert_plan": repr(choice.plan.to_expert_plan()),
        "unpipelined_plan": choice.unpipelined_plan.as_dict(),
        "search": {"seconds": choice.search_seconds, "candidates": choice.evaluated,
                   "moe_layer_ms": choice.predicted_s * 1e3, "unpipelined_moe_layer_ms": choice.unpipelined_s * 1e3,
                   "best_ms_by_pipeline": {k: v * 1e3 for k, v in choice.as_dict()["best_by_pn"].items()}},
        "steps": {"tp_tp": tp_tp.as_dict(), "ep": ep.as_dict(), "eps": eps.as_dict()},
        "ep_layer_ms": layer_shares(ep),
        "why_it_differs": WHY.get(s.model, ""),
        "cost_sources": dict(costs.sources), "files": files,
        "bands": bands(s, args, w, dtype) if args.bands else None,
    }


# Constants the presets assume (hardware.py's _ASSUMED): each is moved by +/-20% for the bands, unless a calibration
# measured it. Latencies move together.
UNCALIBRATED = ("dense_gemm_efficiency", "grouped_gemm_efficiency", "fallback_efficiency", "attention_efficiency",
                "hbm_efficiency", "link_efficiency", "comm_saturation_sms", "async_comm_sms", "latencies")
BAND = 0.2
SKEW_ZIPF = 1.2  # the skewed routing: expert shares ~ rank^-1.2 (experts in a random order, fixed seed)


def _perturbed(hw, name: str, factor: float):
    if name == "latencies":
        return hw.replace(kernel_latency_s=hw.kernel_latency_s * factor, nvlink_latency_s=hw.nvlink_latency_s * factor,
                          pcie_latency_s=hw.pcie_latency_s * factor, network_latency_s=hw.network_latency_s * factor)
    value = getattr(hw, name) * factor
    if name in ("comm_saturation_sms", "async_comm_sms"):
        value = max(1, round(value))
    elif name.endswith("efficiency"):
        value = min(1.0, value)
    return hw.replace(**{name: value})


def bands(s: Setting, args, w, dtype) -> dict:
    """EPS tokens/s and its gain over EP, re-planned, at +/-20% of every constant no calibration measured; and at
    Zipf-skewed routing beside uniform."""
    from epsjax.scheduler import get_hardware

    base = get_hardware(args.hardware)
    measured = {k for k, v in base.sources if str(v).startswith("calibrated")}

    def run(hw, workload):
        costs = CostModel.build(hw, dtype, profile_dir=args.profile_dir, activation_dtype=s.activation_dtype)
        choice = search_plan(workload, costs)
        ep = simulate_step(workload, costs, choice.unpipelined_plan).throughput
        eps = simulate_step(workload, costs, choice.plan).throughput
        return eps, eps / ep

    points = {}
    for name in UNCALIBRATED:
        if name in measured:
            continue
        for factor in (1 - BAND, 1 + BAND):
            points[f"{name} x{factor:g}"] = run(_perturbed(base, name, factor), w)
    rng = np.random.default_rng(0)
    shares = np.arange(1, w.cfg.num_experts + 1, dtype=np.float64) ** -SKEW_ZIPF
    skewed = run(base, w.replace(expert_load=tuple(shares[rng.permutation(w.cfg.num_experts)])))
    eps, gain = zip(*points.values())
    return {"eps_tokens_per_s": [min(eps), max(eps)], "gain_eps_vs_ep": [min(gain), max(gain)],
            "perturbed": {k: {"eps_tokens_per_s": v[0], "gain_eps_vs_ep": v[1]} for k, v in points.items()},
            "skewed_zipf": {"eps_tokens_per_s": skewed[0], "gain_eps_vs_ep": skewed[1], "zipf": SKEW_ZIPF},
            "band": BAND, "calibrated": sorted(measured)}


def fmt_k(x):
    return "-" if x is None else f"{x / 1e3:6.1f}K"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hardware", default="h800")
    parser.add_argument("--tokens-per-gpu", type=int, default=8192,
                        help="prompt tokens per GPU per prefill step (assumption; the paper does not state it)")
    parser.add_argument("--seq-len", type=int, default=1024, help="prompt length (assumption)")
    parser.add_argument("--models", nargs="*", help="labels or model names to run (default: all)")
    parser.add_argument("--profile-dir", default=None, help="GEMM profile tables (default pallas_kernels/profiles)")
    parser.add_argument("--out-dir", default=str(ROOT / "scripts" / "results"))
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--no-bands", dest="bands", action="store_false",
                        help="skip the +/-20%% bands over uncalibrated constants and the skewed-routing column")
    args = parser.parse_args(argv)
    args.out_dir = pathlib.Path(args.out_dir).resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    settings = [s for s in SETTINGS if not args.models or s.model in args.models or (s.label or s.model) in args.models]
    t0 = time.perf_counter()
    rows = [run_setting(s, args) for s in settings]
    elapsed = time.perf_counter() - t0

    print(f"Simulated prefill throughput on {args.hardware.upper()} ({args.tokens_per_gpu} tokens/GPU per step, "
          f"prompts of {args.seq_len}); paper = EPS-MoE Table 1")
    header = (f"{'model':24s} {'GPUs':>4s} {'W GB/GPU':>8s}  {'TP+TP':>7s} {'TP/DP+EP':>8s} {'EPS':>7s} "
              f"{'vs TP':>6s} {'vs EP':>6s}   {'paper base':>10s} {'paper EPS':>9s} {'gain':>6s}  {'EPS sim/paper':>13s}"
              f"  plan (search ms)")
    print(header)
    print("-" * len(header))
    for r in rows:
        sim, paper = r["simulated_tokens_per_s"], r["paper_tokens_per_s"]
        vs = "-" if r["eps_sim_vs_paper"] is None else f"{100 * r['eps_sim_vs_paper']:+.1f}%"
        pg = "-" if r["paper_gain"] is None else f"{100 * (r['paper_gain'] - 1):+.1f}%"
        plan = r["plan"]
        print(f"{r['label']:24s} {r['devices']:4d} {r['weights_gb_per_gpu']['ep']:8.1f}  {fmt_k(sim['tp_tp'])} "
              f"{fmt_k(sim['ep']):>8s} {fmt_k(sim['eps'])} {100 * (r['simulated_gain_eps_vs_tp_tp'] - 1):+5.1f}% "
              f"{100 * (r['simulated_gain_eps_vs_ep'] - 1):+5.1f}%   {fmt_k(paper['baseline']):>10s} "
              f"{fmt_k(paper['eps']):>9s} {pg:>6s}  {vs:>13s}  PN={plan['pipeline_degree']} {plan['split']} "
              f"{'/'.join(sorted(set(plan['backends'])))} sm_comm={plan['sm_for_comm']} "
              f"({1e3 * r['search']['seconds']:.0f})")
    print("vs TP / vs EP: simulated EPS over simulated TP+TP / TP-DP+EP; gain: the paper's EPS over its baseline "
          "(vLLM TP for Mixtral and DBRX, DeepSeek's own stack for DeepSeek-V2). W GB/GPU: weights per GPU under EP.")
    if rows and rows[0]["bands"]:
        print(f"\nBands: EPS tokens/s and its gain over EP, re-planned at +/-{100 * BAND:.0f}% of every uncalibrated "
              f"constant ({', '.join(UNCALIBRATED)}); skewed: Zipf({SKEW_ZIPF}) routing shares")
        for r in rows:
            b = r["bands"]
            lo, hi = b["eps_tokens_per_s"]
            glo, ghi = b["gain_eps_vs_ep"]
            sk = b["skewed_zipf"]
            print(f"  {r['label']:24s} EPS {fmt_k(lo)} .. {fmt_k(hi)}  gain {100 * (glo - 1):+5.1f}% .. "
                  f"{100 * (ghi - 1):+5.1f}%   skewed: EPS {fmt_k(sk['eps_tokens_per_s'])} gain "
                  f"{100 * (sk['gain_eps_vs_ep'] - 1):+5.1f}%")
    print("\nOne unpipelined TP/DP+EP MoE layer (ms per GPU): what the pipeline can hide (all-to-all) and not")
    for r in rows:
        x = r["ep_layer_ms"]
        print(f"  {r['label']:24s} layer {x['layer']:6.2f}  all-to-all {x['all_to_all']:5.2f} "
              f"({100 * x['all_to_all'] / x['layer']:4.1f}%)  TP collectives {x['tp_collectives']:5.2f}  "
              f"expert GEMMs {x['expert_gemm']:5.2f}  attention {x['attention']:5.2f}")
    print("\nWhy the simulation differs from the paper:")
    for r in rows:
        if r["why_it_differs"] and r["label"] == r["model"]:
            print(f"  {r['label']}: {r['why_it_differs']}")
    sources = rows[0]["cost_sources"] if rows else {}
    print("\nCost model sources:")
    for part, src in sources.items():
        print(f"  {part}: {src}")
    out = {
        "command": " ".join(["scripts/simulate_eps.py", *(argv if argv is not None else sys.argv[1:])]),
        "hardware": args.hardware, "workload": {"tokens_per_gpu": args.tokens_per_gpu, "seq_len": args.seq_len,
                                               "context": 0, "routing": "uniform shares with multinomial noise"},
        "paper": "EPS-MoE (Qian et al., arXiv:2410.12247v2) Table 1",
        "elapsed_s": elapsed, "results": rows,
    }
    path = args.out_dir / "simulate_eps.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
