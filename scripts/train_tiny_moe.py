"""Train a small Mixtral-family MoE on real text (the Python standard library's own sources), on CPU.

Why: routing traces from a random-weight model have none of the structure ExpertFlow exploits (temporal locality,
token-type specialisation, layer-to-layer correlation). This script trains a model whose routers have learned
something, small enough to commit and to run in tests, so the predictor, the caches and the offload timing model can
be judged on real routing.

Corpus: every `*.py` file of the running interpreter's standard library (not site-packages or the test suites),
sorted by path; every 10th file is held out for evaluation and never seen by the tokenizer or the optimiser. Those
sources are under the PSF License Agreement (LICENSE.txt beside them); only the trained weights and tokenizer are
committed, not the text.

Deterministic: the file order, split, tokenizer training and batch sampling are fixed; one seed drives the
initialisation and the batches. The default budget (900 steps of 16 x 256 tokens) trains in about 23 minutes on 2
CPU cores. Output: a Hugging Face directory (config.json, model.safetensors in bfloat16, tokenizer.json,
training.json with the loss curve and settings) and a loss plot.

    python scripts/train_tiny_moe.py --out checkpoints/pystdlib-moe
"""

from __future__ import annotations

import argparse
import hashlib
import os
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"  # no CUDA plugin probing on a CPU-only host

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from tqdm import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from epsjax.checkpoint import save_checkpoint  # noqa: E402
from epsjax.provenance import git_commit  # noqa: E402
from epsjax.models import LocalExperts, MoETransformer, get_preset  # noqa: E402
from epsjax.models.attention import AttentionContext  # noqa: E402
from epsjax.models.transformer import prefill_mask  # noqa: E402

END_OF_TEXT = "<|endoftext|>"
HELD_OUT_EVERY = 10  # every 10th file (sorted by path) is held out


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    held = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == 0]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != 0]
    return train, held


def read_texts(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenisation), trained on the training files only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode(tok, texts: list[str]) -> np.ndarray:
    """One stream of token ids: each file's tokens followed by the end-of-text token."""
    eot = tok.token_to_id(END_OF_TEXT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, np.int32)


def model_config(vocab_size: int, eos_id: int):
    """~6M parameters: 6 layers, 8 experts top-2 of FFN width 256 each, d_model 128, GQA 4 heads / 2 KV heads."""
    return get_preset("tiny-mixtral").replace(
        name="pystdlib-moe", vocab_size=vocab_size, d_model=128, num_layers=6, num_heads=4, num_kv_heads=2,
        head_dim=32, num_experts=8, expert_ffn_dim=256, max_seq_len=2048, eos_token_id=eos_id, pad_token_id=eos_id,
        dtype="float32")


def forward_losses(model: MoETransformer, tokens_BT, experts):
    """Next-token cross-entropy and the Switch-style load-balancing loss E * sum_e f_e * P_e (mean over layers)."""
    cfg = model.cfg
    inputs_BT, targets_BT = tokens_BT[:, :-1], tokens_BT[:, 1:]
    B, T = inputs_BT.shape
    valid_BT = jnp.ones((B, T), bool)
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = AttentionContext(positions_BT=positions_BT, mask_BTS=prefill_mask(valid_BT), write_index=0,
                           attend_to_cache=False, causal=True)
    x_BTD = model.embed(inputs_BT)
    balance = 0.0
    for layer in model.layers:
        h_BTD, _ = layer.attention(x_BTD, ctx, None)
        moe_in_BTD = layer.moe_input(x_BTD, h_BTD)
        logits_TE = jnp.einsum("TD,DE->TE", moe_in_BTD.reshape(B * T, -1), layer.moe.router.kernel_DE[...])
        probs_TE = jax.nn.softmax(logits_TE, axis=-1)
        _, ids_TK = jax.lax.top_k(probs_TE, cfg.router.top_k)
        fraction_E = jnp.mean(jax.nn.one_hot(ids_TK, cfg.num_experts).sum(1), axis=0) / cfg.router.top_k
        balance += cfg.num_experts * jnp.sum(fraction_E * probs_TE.mean(0))
        moe_BTD, _ = layer.moe(moe_in_BTD, valid_BT, experts)
        x_BTD = layer.moe_output(h_BTD, moe_BTD)
    logits_BTV = model.logits(x_BTD)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()
    return ce, balance / len(model.layers)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="checkpoints/pystdlib-moe")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--balance-coef", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-batches", type=int, default=16)
    args = p.parse_args()
    out = Path(args.out)
    t_start = time.perf_counter()

    files = stdlib_files()
    train_files, held_files = split_files(files)
    train_texts, held_texts = read_texts(train_files), read_texts(held_files)
    corpus_sha = hashlib.sha256("\n".join(train_texts + held_texts).encode()).hexdigest()[:16]
    print(f"corpus: {len(train_files)} train / {len(held_files)} held-out stdlib files "
          f"({sum(map(len, train_texts)) / 1e6:.1f}M / {sum(map(len, held_texts)) / 1e6:.1f}M chars, "
          f"Python {sys.version.split()[0]}, sha {corpus_sha})", flush=True)
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids, held_ids = encode(tok, train_texts), encode(tok, held_texts)
    print(f"tokenizer: byte-level BPE, {tok.get_vocab_size()} tokens; {len(train_ids) / 1e6:.2f}M train / "
          f"{len(held_ids) / 1e6:.2f}M held-out tokens ({time.perf_counter() - t_start:.0f} s)", flush=True)

    eos_id = tok.token_to_id(END_OF_TEXT)
    cfg = model_config(tok.get_vocab_size(), eos_id)
    model = MoETransformer(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {cfg.name}, {n_params / 1e6:.2f}M parameters, {cfg.num_layers} layers x {cfg.num_experts} "
          f"experts top-{cfg.router.top_k}", flush=True)
    experts = LocalExperts(backend="ragged_dot")  # lax.ragged_dot: dropless and differentiable

    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup_steps=min(100, args.steps // 10),
                                                  decay_steps=args.steps, end_value=args.lr / 10)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)

    def loss_fn(params, tokens_BT):
        ce, balance = forward_losses(nnx.merge(graphdef, params), tokens_BT, experts)
        return ce + args.balance_coef * balance, (ce, balance)

    @jax.jit
    def train_step(params, opt_state, tokens_BT):
        (_, (ce, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens_BT)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, balance

    @jax.jit
    def eval_step(params, tokens_BT):
        return forward_losses(nnx.merge(graphdef, params), tokens_BT, experts)[0]

    rng = np.random.default_rng(args.seed)
    window = args.seq_len + 1

    def batch(ids, size):
        starts = rng.integers(0, len(ids) - window, size)
        return jnp.asarray(np.stack([ids[s:s + window] for s in starts]))

    eval_rng = np.random.default_rng(args.seed + 1)
    eval_starts = eval_rng.integers(0, len(held_ids) - window, (args.eval_batches, args.batch))
    eval_batches = [jnp.asarray(np.stack([held_ids[s:s + window] for s in row])) for row in eval_starts]

    def held_out_loss(params):
        return float(np.mean([float(eval_step(params, b)) for b in eval_batches]))

    initial_eval = held_out_loss(params)
    history = {"step": [], "train_ce": [], "balance": [], "eval_step": [0], "eval_ce": [initial_eval]}
    t_train = time.perf_counter()
    bar = tqdm(range(1, args.steps + 1), desc="train", unit="step", mininterval=5)
    for step in bar:
        params, opt_state, ce, balance = train_step(params, opt_state, batch(train_ids, args.batch))
        if step % 10 == 0 or step == args.steps:
            history["step"].append(step)
            history["train_ce"].append(float(ce))
            history["balance"].append(float(balance))
            bar.set_postfix(ce=f"{float(ce):.3f}", balance=f"{float(balance):.3f}")
        if step % max(1, args.steps // 8) == 0 or step == args.steps:
            history["eval_step"].append(step)
            history["eval_ce"].append(held_out_loss(params))
            bar.write(f"step {step}: held-out cross-entropy {history['eval_ce'][-1]:.3f} "
                      f"(perplexity {math.exp(history['eval_ce'][-1]):.1f})")
    train_s = time.perf_counter() - t_train

    nnx.update(model, params)
    save_model = MoETransformer(cfg.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    nnx.update(save_model, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    save_checkpoint(save_model, out)
    tok.save(str(out / "tokenizer.json"))
    summary = {
        "model": cfg.name, "parameters": int(n_params), "steps": args.steps, "batch": args.batch,
        "seq_len": args.seq_len, "tokens_seen": args.steps * args.batch * args.seq_len, "lr": args.lr,
        "balance_coef": args.balance_coef, "seed": args.seed, "train_seconds": round(train_s, 1),
        "corpus": {"what": "Python standard library *.py sources (no site-packages, no test suites)",
                   "license": "PSF License Agreement (Python-2.0)", "python": sys.version.split()[0],
                   "files_train": len(train_files), "files_held_out": len(held_files), "sha256_16": corpus_sha,
                   "tokens_train": int(len(train_ids)), "tokens_held_out": int(len(held_ids)),
                   "held_out_rule": f"every {HELD_OUT_EVERY}th file in sorted path order"},
        "held_out_ce_float32": history["eval_ce"][-1], "history": history, "commit": git_commit(),
        "jax": jax.__version__,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    plot(history, out / "loss.png")
    print(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB) after "
          f"{train_s / 60:.1f} min of training; held-out perplexity {math.exp(history['eval_ce'][-1]):.2f}")
    return 0


def plot(history: dict, file: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(history["step"], history["train_ce"], lw=0.8, label="train (batch)")
    ax.plot(history["eval_step"], history["eval_ce"], "o-", label="held-out files")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(top=min(9.0, max(history["train_ce"][:1] + [3.0])))
    ax.set_title("pystdlib-moe: 8 experts top-2 on Python stdlib sources")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(file, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
