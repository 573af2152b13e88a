"""epsjax against transformers on the same checkpoint and token ids, on this machine, timed alternately in one run.

    /root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/peer311          # once: the peer's venv (torch: 3.11 only)
    /tmp/peer311/bin/pip install torch==2.13.0 'transformers==5.17.*' safetensors numpy
    .venv/bin/python scripts/bench_vs_transformers.py --peer-python /tmp/peer311/bin/python
    .venv/bin/python scripts/bench_vs_transformers.py --peer-python ... --quick     # one point per family

For each family (Mixtral, Qwen3-MoE, DeepSeek-V2: mid-size random checkpoints that transformers itself writes,
scripts/peer_transformers.py) and each batch size x prompt length, it times

- prefill: one forward over the prompts writing the KV cache, to each sequence's greedy next token on the host;
- decode: the steady state, `--decode-steps` greedy steps over the KV cache after an untimed prefill (epsjax: its
  public `Engine.generate`, whose decode time excludes the prefill), as new tokens per second,

alternating the two sides (A, B, then B, A, ...) `--repeats` times after one untimed warm-up each (epsjax compiles
then), float32 on both sides. It checks that the greedy tokens agree, records the machine's load before and after,
and writes JSON and a plot (scripts/results/bench_vs_transformers_cpu.{json,png}). Ratios are epsjax / transformers
tokens/s from the medians (best-of-N beside them). The peer runs with transformers' default expert implementation
(grouped_mm on torch 2.13 CPU), SDPA attention and torch's default threads (one per core), all recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from epsjax.checkpoint import load_checkpoint  # noqa: E402
from epsjax.engine import Engine, SamplingParams  # noqa: E402
from epsjax.host_memory import keep_freed_memory  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402

FAMILIES = ("mixtral", "qwen3_moe", "deepseek_v2")
PEER_HELP = ("the peers' Python 3.11 interpreter with torch and transformers: "
             "/root/.pyenv/versions/3.11.7/bin/python -m venv /tmp/peer311 && "
             "/tmp/peer311/bin/pip install torch==2.13.0 'transformers==5.17.*' safetensors numpy")


class PeerProcess:
    """scripts/peer_transformers.py in the peer interpreter, one JSON request and reply per line."""

    def __init__(self, python: str):
        self.proc = subprocess.Popen([python, str(ROOT / "scripts" / "peer_transformers.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, cmd: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers worker exited during {cmd!r}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"transformers worker, {cmd}: {reply['error']}")
        return reply

    def close(self):
        try:
            self("quit")
        except (RuntimeError, BrokenPipeError, json.JSONDecodeError):
            pass
        self.proc.wait(timeout=30)


class EpsjaxSide:
    def __init__(self, path: Path):
        self.model = load_checkpoint(path, dtype="float32", progress=False)
        self.engine = Engine(self.model)

    def prefill(self, tokens: np.ndarray, steps: int) -> dict:
        cache_len = min(self.engine.cfg.max_seq_len, -(-(tokens.shape[1] + steps + 1) // 64) * 64)
        start = time.perf_counter()
        logits, _, _ = self.engine.prefill(tokens, cache_len=cache_len)
        nxt = np.asarray(jax.numpy.argmax(logits, -1))
        return {"seconds": time.perf_counter() - start, "next": nxt.tolist()}

    def decode(self, tokens: np.ndarray, steps: int) -> dict:
        result = self.engine.generate(tokens.tolist(), max_new_tokens=steps + 1, sampling=SamplingParams(),
                                      stop_at_eos=False)
        return {"seconds": result.decode_seconds, "tokens": result.tokens}


def machine_load() -> dict:
    """Load averages and the busy fraction of all cores over half a second (from /proc/stat)."""
    def busy_total():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    b0, t0 = busy_total()
    time.sleep(0.5)
    b1, t1 = busy_total()
    return {"loadavg": os.getloadavg(), "busy_fraction": round((b1 - b0) / max(t1 - t0, 1), 3)}




def summarize(ours: list[float], theirs: list[float], tokens: int) -> dict:
    ours_tps = [tokens / s for s in ours]
    theirs_tps = [tokens / s for s in theirs]
    return {"epsjax_seconds": ours, "transformers_seconds": theirs,
            "epsjax_tokens_per_s": {"median": statistics.median(ours_tps), "best": max(ours_tps)},
            "transformers_tokens_per_s": {"median": statistics.median(theirs_tps), "best": max(theirs_tps)},
            "ratio_median": statistics.median(ours_tps) / statistics.median(theirs_tps),
            "ratio_best": max(ours_tps) / max(theirs_tps)}


def run_point(ours: EpsjaxSide, peer: PeerProcess, batch: int, length: int, steps: int, repeats: int, vocab: int,
              seed: int) -> dict:
    tokens = np.random.default_rng(seed).integers(3, vocab, (batch, length), dtype=np.int64)
    ours.prefill(tokens, steps)                      # warm-up (epsjax compiles here)
    peer("prefill", tokens=tokens.tolist())
    prefill = {"epsjax": [], "transformers": []}
    decode = {"epsjax": [], "transformers": []}
    next_ours = next_theirs = tokens_ours = tokens_theirs = None
    for rep in range(repeats):
        order = ("epsjax", "transformers") if rep % 2 == 0 else ("transformers", "epsjax")
        for side in order:
            if side == "epsjax":
                r = ours.prefill(tokens, steps)
                next_ours = r["next"]
            else:
                r = peer("prefill", tokens=tokens.tolist())
                next_theirs = r["next"]
            prefill[side].append(r["seconds"])
    ours.decode(tokens, steps)                       # warm-up of the decode programs
    peer("decode", tokens=tokens.tolist(), steps=1)
    for rep in range(repeats):
        order = ("epsjax", "transformers") if rep % 2 == 0 else ("transformers", "epsjax")
        for side in order:
            if side == "epsjax":
                r = ours.decode(tokens, steps)
                tokens_ours = r["tokens"]
            else:
                r = peer("decode", tokens=tokens.tolist(), steps=steps)
                tokens_theirs = r["tokens"]
            decode[side].append(r["seconds"])
    ours_arr, theirs_arr = np.asarray(tokens_ours), np.asarray(tokens_theirs)
    mismatched = int((ours_arr != theirs_arr).any(axis=1).sum())
    return {"batch": batch, "prompt_len": length, "decode_steps": steps,
            "prefill": summarize(prefill["epsjax"], prefill["transformers"], batch * length),
            "decode": summarize(decode["epsjax"], decode["transformers"], batch * steps),
            "prefill_next_tokens_match": next_ours == next_theirs,
            "greedy_sequences_mismatched": mismatched, "sequences": batch}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in result["families"]]
    fig, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 7), squeeze=False)
    for col, fam in enumerate(families):
        points = result["families"][fam]["points"]
        labels = [f"{p['batch']}x{p['prompt_len']}" for p in points]
        for row, phase in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            ratios = [p[phase]["ratio_median"] for p in points]
            ax.bar(range(len(points)), ratios, color=["tab:green" if r >= 1 else "tab:red" for r in ratios])
            ax.axhline(1.0, color="black", lw=1)
            ax.axhline(1.5, color="gray", lw=1, ls="--")
            ax.set_xticks(range(len(points)), labels, rotation=45, fontsize=8)
            ax.set_title(f"{fam} {phase}")
            ax.set_ylabel("epsjax / transformers tokens/s")
    fig.suptitle(f"epsjax vs transformers {result['peer']['transformers']} (torch {result['peer']['torch']}), "
                 f"float32, {result['machine']['cpus']} CPU cores, commit {result['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    lines = ["family | batch x prompt | prefill tok/s epsjax / transformers | ratio | decode tok/s epsjax / "
             "transformers | ratio | greedy tokens", "--- | --- | --- | --- | --- | --- | ---"]
    for fam, data in result["families"].items():
        for p in data["points"]:
            pre, dec = p["prefill"], p["decode"]
            lines.append(
                f"{fam} | {p['batch']}x{p['prompt_len']} | {pre['epsjax_tokens_per_s']['median']:,.0f} / "
                f"{pre['transformers_tokens_per_s']['median']:,.0f} | {pre['ratio_median']:.2f}x | "
                f"{dec['epsjax_tokens_per_s']['median']:,.1f} / {dec['transformers_tokens_per_s']['median']:,.1f} | "
                f"{dec['ratio_median']:.2f}x | "
                + ("match" if not p["greedy_sequences_mismatched"] and p["prefill_next_tokens_match"] else
                   f"{p['greedy_sequences_mismatched']} of {p['sequences']} differ"))
    return "\n".join(lines)


def compare(before: dict, after: dict, path: Path) -> str:
    """The epsjax / transformers ratios of two runs (each against the peer in its own run) side by side: a
    markdown table, and a plot of both at every point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = ["family | batch x prompt | prefill: before -> after (x transformers) | decode: before -> after (x "
             "transformers) | tokens", "--- | --- | --- | --- | ---"]
    families = [f for f in after["families"] if f in before["families"]]
    fig, axes = plt.subplots(2, len(families), figsize=(5 * len(families), 7), squeeze=False)
    for col, fam in enumerate(families):
        old = {(p["batch"], p["prompt_len"]): p for p in before["families"][fam]["points"]}
        points = [p for p in after["families"][fam]["points"] if (p["batch"], p["prompt_len"]) in old]
        for p in points:
            q = old[(p["batch"], p["prompt_len"])]
            match = "match" if not p["greedy_sequences_mismatched"] and p["prefill_next_tokens_match"] else "DIFFER"
            lines.append(f"{fam} | {p['batch']}x{p['prompt_len']} | {q['prefill']['ratio_median']:.2f}x -> "
                         f"**{p['prefill']['ratio_median']:.2f}x** | {q['decode']['ratio_median']:.2f}x -> "
                         f"**{p['decode']['ratio_median']:.2f}x** | {match}")
        labels = [f"{p['batch']}x{p['prompt_len']}" for p in points]
        x = np.arange(len(points))
        for row, phase in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            ax.bar(x - 0.2, [old[(p["batch"], p["prompt_len"])][phase]["ratio_median"] for p in points], 0.4,
                   label=f"before ({before['commit']})", color="tab:gray")
            ax.bar(x + 0.2, [p[phase]["ratio_median"] for p in points], 0.4, label=f"after ({after['commit']})",
                   color="tab:green")
            ax.axhline(1.0, color="black", lw=1)
            ax.axhline(1.5, color="gray", lw=1, ls="--")
            ax.set_xticks(x, labels, rotation=45, fontsize=8)
            ax.set_title(f"{fam} {phase}")
            ax.set_ylabel("epsjax / transformers tokens/s")
            ax.legend(fontsize=7)
    fig.suptitle("epsjax / transformers (float32, 2 CPU cores), each run against the peer in the same run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None) -> int:
    keep_freed_memory()  # epsjax.host_memory: glibc keeps freed host memory; before the first jax computation
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=os.environ.get("EPSJAX_PEER_PYTHON"), help=PEER_HELP)
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--prompt-lens", default="128,512,2048")
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="batch 4 x 256 only, 2 repeats")
    parser.add_argument("--checkpoints", default="/tmp/epsjax-bench-checkpoints",
                        help="where the peer writes (or has written) the checkpoints")
    parser.add_argument("--out", default=str(ROOT / "scripts" / "results" / "bench_vs_transformers_cpu.json"))
    parser.add_argument("--label", default="", help="a note stored with the results (e.g. 'before')")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="no run: tabulate and plot two result files side by side (next to AFTER)")
    args = parser.parse_args(argv)
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        print(compare(before, after, Path(args.compare[1]).with_name("bench_vs_transformers_before_after.png")))
        return 0
    if not args.peer_python or not Path(args.peer_python).exists():
        print(f"bench_vs_transformers: error: --peer-python must name {PEER_HELP}", file=sys.stderr)
        return 2
    families = args.families.split(",")
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        print(f"bench_vs_transformers: error: unknown families {unknown}; choose from {FAMILIES}", file=sys.stderr)
        return 2
    batches = [4] if args.quick else [int(b) for b in args.batches.split(",")]
    lengths = [256] if args.quick else [int(n) for n in args.prompt_lens.split(",")]
    repeats = 2 if args.quick else args.repeats

    load_before = machine_load()  # before the worker starts (importing torch keeps a core busy for a while)
    peer = PeerProcess(args.peer_python)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"commit": git_commit(), "label": args.label, "jax": jax.__version__, "dtype": "float32",
              "machine": {"cpus": os.cpu_count(), "host": platform.node(), "processor": platform.processor()},
              "load_before": load_before, "decode_steps": args.decode_steps, "repeats": repeats, "families": {}}
    try:
        points = list(itertools.product(families, batches, lengths))
        bar = tqdm(points, desc="points", unit="point")
        for fam in families:
            path = Path(args.checkpoints) / f"{fam}-bench"
            if not (path / "config.json").exists():
                bar.write(f"writing a random {fam} checkpoint with transformers to {path}")
                peer("make_checkpoint", family=fam, path=str(path))
            result["peer"] = peer("load", path=str(path))
            ours = EpsjaxSide(path)
            cfg = ours.model.cfg
            result["families"][fam] = {"checkpoint": str(path), "d_model": cfg.d_model, "layers": cfg.num_layers,
                                       "experts": cfg.num_experts, "top_k": cfg.router.top_k,
                                       "expert_ffn_dim": cfg.expert_ffn_dim, "points": []}
            for i, (batch, length) in enumerate(itertools.product(batches, lengths)):
                bar.set_postfix_str(f"{fam} {batch}x{length}")
                point = run_point(ours, peer, batch, length, args.decode_steps, repeats, cfg.vocab_size, seed=i)
                result["families"][fam]["points"].append(point)
                out.write_text(json.dumps(result, indent=1))
                bar.update()
            del ours
            jax.clear_caches()
        bar.close()
    finally:
        peer.close()
    result["load_after"] = machine_load()
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(table(result))
    print(f"load before {result['load_before']}, after {result['load_after']}; wrote {out} and "
          f"{out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
