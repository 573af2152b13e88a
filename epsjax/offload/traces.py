"""Routing traces: which experts every MoE layer routes each token to, recorded by running the model.

A trace set is tokens [N, T] int32 and ids [N, T, L, K] int32 (L MoE layers, top-k ids; -1 where a token is
padding), saved as one .npz with the model's config name. Because the model is causal, the routing of position t
in a prefill equals the routing of the same token when it is decoded at step t, so prefills of whole sequences give
decode traces too.

`synthetic_corpus` makes token streams with text-like statistics for models without a tokenizer or data: a sparse
bigram Markov chain over the vocabulary with Zipf-distributed start and transition probabilities (frequent tokens
recur, successive tokens are correlated), so that routing has both token-level structure and temporal locality.
"""

from __future__ import annotations

import pathlib

import numpy as np

from epsjax.offload.errors import OffloadError


def synthetic_corpus(vocab_size: int, num_seqs: int, seq_len: int, *, seed: int = 0, chain_seed: int = 0,
                     successors: int = 8, zipf: float = 1.1, first_token: int = 1) -> np.ndarray:
    """tokens [num_seqs, seq_len] int32 in [first_token, vocab_size) (id 0 is left for padding). `chain_seed` fixes
    the chain (the "language"), `seed` the samples drawn from it: held-out data is another seed, same chain."""
    rng = np.random.default_rng(chain_seed)
    ids = np.arange(first_token, vocab_size)
    V = len(ids)
    rank_weights = 1.0 / np.arange(1, V + 1) ** zipf
    popularity = rng.permutation(V)  # token -> rank
    start_p = rank_weights[popularity] / rank_weights[popularity].sum()
    succ = np.stack([rng.choice(V, size=successors, replace=False, p=start_p) for _ in range(V)])  # [V, s]
    succ_p = 1.0 / np.arange(1, successors + 1) ** zipf
    succ_p /= succ_p.sum()
    rng = np.random.default_rng([chain_seed, seed])
    out = np.empty((num_seqs, seq_len), np.int64)
    out[:, 0] = rng.choice(V, size=num_seqs, p=start_p)
    for t in range(1, seq_len):
        pick = rng.choice(successors, size=num_seqs, p=succ_p)
        jump = rng.random(num_seqs) < 0.1  # occasionally restart from the unigram distribution
        out[:, t] = np.where(jump, rng.choice(V, size=num_seqs, p=start_p), succ[out[:, t - 1], pick])
    return ids[out].astype(np.int32)


def collect_traces(engine, tokens_NT: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Routing ids [N, T, L, K] of every sequence, by prefilling them in batches through an OffloadEngine (any mode;
    "device" is the fastest) created with record_routing=True."""
    if not engine.record_routing:
        raise OffloadError("collect_traces needs an OffloadEngine created with record_routing=True")
    tokens_NT = np.asarray(tokens_NT, np.int32)
    N, T = tokens_NT.shape
    out = []
    for start in range(0, N, batch_size):
        batch = tokens_NT[start:start + batch_size]
        B = batch.shape[0]
        engine.routing_log.clear()
        engine.prefill(batch, np.ones(batch.shape, bool), cache_len=T)
        routing_LTK = engine.routing_log[-1]  # [L, B*T, K]
        out.append(routing_LTK.reshape(routing_LTK.shape[0], B, T, -1).transpose(1, 2, 0, 3))
    return np.concatenate(out).astype(np.int32)


def save_traces(path, tokens_NT, ids_NTLK, **meta) -> pathlib.Path:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, tokens=tokens_NT, ids=ids_NTLK, **{k: np.asarray(v) for k, v in meta.items()})
    return path


def load_traces(path) -> dict:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def split(tokens_NT, ids_NTLK, *, held_out: float = 0.2, seed: int = 0):
    """(train tokens, train ids), (test tokens, test ids) by sequence."""
    N = tokens_NT.shape[0]
    perm = np.random.default_rng(seed).permutation(N)
    n_test = max(1, int(round(held_out * N)))
    test, train = perm[:n_test], perm[n_test:]
    return (tokens_NT[train], ids_NTLK[train]), (tokens_NT[test], ids_NTLK[test])


def parse_overrides(items) -> dict:
    """["num_experts=16", "dtype=float32"] -> {"num_experts": 16, "dtype": "float32"} (ints and floats parsed)."""
    out = {}
    for item in items or ():
        key, _, value = item.partition("=")
        if not _:
            raise OffloadError(f"override {item!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def build_model(preset: str, overrides: dict | None = None, *, seed: int = 0, checkpoint: str | None = None):
    """A model from a preset (random weights from `seed`, fields overridden) or from an HF checkpoint directory."""
    from flax import nnx

    from epsjax.models import MoETransformer, get_preset

    if checkpoint:
        from epsjax.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, progress=False)
    return MoETransformer(get_preset(preset, **(overrides or {})), rngs=nnx.Rngs(seed))


def map_routing(ids_NTLK, tokens_NT, *, small_experts: int, num_layers: int, num_experts: int, top_k: int):
    """Routing of a small model mapped onto a larger one's MoE layers and experts (for the timing model).

    Layer j of the larger model takes the small model's layer floor(j * L_small / num_layers). Each small expert e
    stands for the block of g = num_experts / E_small experts [e*g, (e+1)*g); a token routed to e uses q =
    top_k / K_small of them: q consecutive (mod g) from an offset hashed from (token id, layer j, e). So the
    larger routing keeps the small model's expert-level structure (load, temporal locality, layer correlation),
    a token's sub-experts are a fixed function of the token (token-type specialisation), and its forecast maps the
    same way (pass it the predicted top-k ids).
    ids [N, T, L_small, K_small] (-1 = padding) -> [N, T, num_layers, top_k] int32 (-1 kept)."""
    ids = np.asarray(ids_NTLK)
    N, T, Ls, Ks = ids.shape
    Es = small_experts
    if num_experts % Es or top_k % Ks or top_k // Ks > num_experts // Es:
        raise OffloadError(f"cannot map {Es} experts top-{Ks} onto {num_experts} experts top-{top_k}: the expert "
                           f"counts and top-k must be multiples, with top_k/K_small <= num_experts/E_small")
    g, q = num_experts // Es, top_k // Ks
    src = (np.arange(num_layers) * Ls) // num_layers
    small = ids[:, :, src]  # [N, T, L, Ks]
    tok = np.asarray(tokens_NT, np.int64)[:, :, None, None]
    layer = np.arange(num_layers, dtype=np.int64)[None, None, :, None]
    offset = (tok * 2654435761 + layer * 40503 + small.astype(np.int64) * 97) % g  # [N, T, L, Ks]
    sub = (offset[..., None] + np.arange(q)) % g  # [N, T, L, Ks, q]
    big = small[..., None].astype(np.int64) * g + sub
    big = np.where(small[..., None] >= 0, big, -1)
    return big.reshape(N, T, num_layers, Ks * q).astype(np.int32)
