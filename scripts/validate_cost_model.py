"""Validate the scheduler's cost model against a measured single-GPU MoE layer (needs a GPU).

For the MoE shapes of a model (its D, F, top-k) with `--local-experts` experts on one device, it times the
layer the runtime runs on one device - the router matmul, then models.moe.LocalExperts: sort by expert,
pallas_kernels.expert_ffn with the chosen backend, unsort and combine - at several loads (balanced tokens per
expert, and Dirichlet(0.3)-skewed shares of the same total), and compares with the scheduler's prediction for
the detected hardware (router + permute + expert FFN at the realised group sizes + unpermute). It prints the
error per case and the median / max |error|, and writes scripts/results/validate_cost_model_<device>.json.

    .venv/bin/python scripts/validate_cost_model.py                          # on a GPU with a hardware preset
    .venv/bin/python scripts/validate_cost_model.py --profile-dir none       # presets only, ignore profile tables
    .venv/bin/python scripts/validate_cost_model.py --hardware h100 --tiny --allow-cpu --backends dense
                                                                            # plumbing check on CPU (numbers
                                                                            # meaningless: CPU vs GPU model)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from epsjax.host_memory import keep_freed_memory  # noqa: E402
from epsjax.scheduler import CostModel, hardware_for_device_kind  # noqa: E402
from epsjax.scheduler import layer_costs as lc  # noqa: E402
from epsjax.models.config import get_preset  # noqa: E402
from epsjax.models.moe import LocalExperts  # noqa: E402

TOKENS_PER_EXPERT = (64, 256, 1024, 2048, 4096, 8192)
TINY_TOKENS_PER_EXPERT = (8, 32)


def group_sizes(load: str, tokens_per_expert: int, experts: int, seed: int = 0) -> np.ndarray:
    total = tokens_per_expert * experts
    if load == "balanced":
        return np.full(experts, tokens_per_expert, np.int64)
    shares = np.random.default_rng(seed).dirichlet(np.full(experts, 0.3))
    sizes = np.floor(shares * total).astype(np.int64)
    sizes[np.argmax(sizes)] += total - sizes.sum()
    return sizes


def predict(costs: CostModel, cfg, sizes: np.ndarray, backend: str) -> float:
    """Router + permute + expert FFN (at these exact group sizes) + unpermute on one device, in seconds."""
    tokens = int(sizes.sum()) // cfg.router.top_k
    ffn = costs.gemm_model(backend).ffn_time(sizes, cfg.d_model, cfg.expert_ffn_dim)
    return (lc.router_time(costs, cfg, tokens) + lc.permute_time(costs, cfg, tokens) + ffn
            + lc.unpermute_time(costs, cfg, tokens))


def measure(cfg, sizes: np.ndarray, backend: str, repeats: int, seed: int = 0) -> float:
    """Median seconds of the jitted single-device MoE layer (router matmul + LocalExperts) at these sizes."""
    E, D, F, K = len(sizes), cfg.d_model, cfg.expert_ffn_dim, cfg.router.top_k
    T = int(sizes.sum()) // K
    rng = np.random.default_rng(seed)
    flat = rng.permutation(np.repeat(np.arange(E), sizes))[:T * K]
    dt = cfg.jnp_dtype
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (T, D), dt)
    w_router = (jax.random.normal(keys[1], (D, E), dt) / np.sqrt(D)).astype(dt)
    w_gate = (jax.random.normal(keys[2], (E, D, F), dt) / np.sqrt(D)).astype(dt)
    w_up = (jax.random.normal(keys[3], (E, D, F), dt) / np.sqrt(D)).astype(dt)
    w_down = (jax.random.normal(keys[4], (E, F, D), dt) / np.sqrt(F)).astype(dt)
    ids = jnp.asarray(flat.reshape(T, K), jnp.int32)
    weights = jnp.full((T, K), 1.0 / K, dt)
    valid = jnp.ones((T,), bool)
    experts = LocalExperts(backend=backend)

    @jax.jit
    def layer(x, w_router, ids, weights, w_gate, w_up, w_down):
        logits = jnp.einsum("TD,DE->TE", x, w_router, preferred_element_type=jnp.float32)
        y, _ = experts(x, ids, weights, w_gate, w_up, w_down, valid)
        return y, jnp.sum(logits)

    args = (x, w_router, ids, weights, w_gate, w_up, w_down)
    jax.block_until_ready(layer(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(layer(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def validate(costs: CostModel, cfg, local_experts: int, tokens_per_expert, backends, repeats: int,
             loads=("balanced", "skewed")) -> list[dict]:
    rows = []
    for backend in backends:
        for tpe in tokens_per_expert:
            for load in loads:
                sizes = group_sizes(load, tpe, local_experts)
                measured = measure(cfg, sizes, backend, repeats)
                predicted = predict(costs, cfg, sizes, backend)
                rows.append({"backend": backend, "load": load, "tokens_per_expert": tpe,
                             "max_tokens_per_expert": int(sizes.max()), "measured_s": measured,
                             "predicted_s": predicted, "error": predicted / measured - 1})
                print(f"{backend:12s} {load:9s} {tpe:6d} tok/exp  measured {measured * 1e3:9.3f} ms  predicted "
                      f"{predicted * 1e3:9.3f} ms  error {100 * rows[-1]['error']:+6.1f}%", flush=True)
    return rows


def main(argv=None) -> dict:
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deepseek-v2")
    parser.add_argument("--local-experts", type=int, default=20, help="experts on the device (DeepSeek-V2 EP8: 20)")
    parser.add_argument("--hardware", default=None, help="preset name (default: from the device kind)")
    parser.add_argument("--backends", nargs="*", help="default: the preset's GroupGemm backend and dense")
    parser.add_argument("--tokens", nargs="*", type=int, help="tokens per expert")
    parser.add_argument("--loads", nargs="*", default=["balanced", "skewed"], choices=["balanced", "skewed"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--profile-dir", default=None, help="profile tables to fit from ('none': presets only)")
    parser.add_argument("--tiny", action="store_true", help="small shapes (plumbing check)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on CPU (numbers are not a validation)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    if device.platform == "cpu" and not args.allow_cpu:
        raise SystemExit("validate_cost_model.py compares GPU timings with the GPU cost model; run it on a GPU "
                         "(or pass --allow-cpu for a plumbing check whose numbers mean nothing)")
    hw = args.hardware or hardware_for_device_kind(device.device_kind)
    if hw is None:
        raise SystemExit(f"no hardware preset for device kind {device.device_kind!r}; pass --hardware")
    cfg = get_preset(args.model)
    local = args.local_experts
    if args.tiny:
        cfg = cfg.replace(d_model=128, expert_ffn_dim=128)
        local = min(local, 4)
    use_profiles = args.profile_dir != "none"
    costs = CostModel.build(hw, cfg.dtype, profile_dir=None if not use_profiles else args.profile_dir,
                            use_profiles=use_profiles)
    backends = args.backends or [costs.hw.grouped_backend, "dense"]
    tokens = args.tokens or (TINY_TOKENS_PER_EXPERT if args.tiny else TOKENS_PER_EXPERT)
    print(f"{cfg.name}: D={cfg.d_model} F={cfg.expert_ffn_dim} K={cfg.router.top_k}, {local} local experts on "
          f"{device.device_kind}; cost model {costs.hw.name} ({costs.dtype})")
    for part, src in costs.sources:
        print(f"  {part}: {src}")
    rows = validate(costs, cfg, local, tokens, backends, 3 if args.tiny else args.repeats, args.loads)
    errors = [abs(r["error"]) for r in rows]
    summary = {"median_abs_error": statistics.median(errors), "max_abs_error": max(errors)}
    print(f"median |error| {100 * summary['median_abs_error']:.1f}%, max |error| {100 * summary['max_abs_error']:.1f}%")
    out = {"device_kind": device.device_kind, "platform": device.platform, "hardware_model": costs.hw.name,
           "model": cfg.name, "shapes": {"D": cfg.d_model, "F": cfg.expert_ffn_dim, "K": cfg.router.top_k,
                                         "local_experts": local},
           "cost_sources": dict(costs.sources), "rows": rows, "summary": summary,
           "note": "CPU plumbing run: not a validation" if device.platform == "cpu" else "GPU measurement"}
    name = "".join(ch if ch.isalnum() else "_" for ch in device.device_kind.lower()).strip("_")
    path = pathlib.Path(args.out) if args.out else ROOT / "scripts" / "results" / f"validate_cost_model_{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
