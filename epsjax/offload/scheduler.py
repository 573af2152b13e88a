"""The token scheduler: regroups pending sequences into batches whose routing paths overlap, so a batch activates
fewer distinct experts (fewer transfers, more tokens per expert).

A sequence's routing path is a bit vector of length L*E: the experts its next token is predicted (or known) to use
in every MoE layer. ExpertFlow's step takes two adjacent batches and re-splits their sequences into two equal halves
minimising the summed union of experts. `split_two` does it as a balanced two-cluster k-means on the Hamming
similarity of paths (the half nearest centroid 1 relative to centroid 2 forms group 1), then pairwise swaps while a
swap lowers the exact union cost. `form_batches` applies it to adjacent pairs of a larger pool.

`regroup_states` moves the sequences' decode state with them: KV cache rows, valid-slot masks, rotary positions and
the predictor's recent tokens, and their sampling rows. Every row keeps its own write position (decode slots), so
rows of batches with different prompt lengths move unchanged.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from epsjax.generation import GenerateResult, RequestError, SamplingParams, SlotRows, advance
from epsjax.offload.metrics import topk_chosen
from epsjax.offload.state import OffloadState

_advance_rows = jax.jit(advance)


def union_cost(paths_NP: np.ndarray, groups) -> int:
    """Summed over groups: the number of path bits (layer, expert) any member uses."""
    paths = np.asarray(paths_NP, bool)
    return int(sum(paths[np.asarray(g, int)].any(axis=0).sum() for g in groups if len(g)))


def split_two(paths_NP: np.ndarray, *, iters: int = 10, max_swaps: int | None = None) -> tuple[np.ndarray,
                                                                                              np.ndarray]:
    """Splits N sequences into groups of N // 2 and N - N // 2 with a small summed union of routing paths.
    Returns the two index arrays (sorted)."""
    X = np.asarray(paths_NP, np.float32)
    N = X.shape[0]
    if N < 2:
        return np.arange(N), np.arange(0)
    na = N // 2
    # Initial centroids: the path with most bits, and the path farthest from it in Hamming distance.
    i0 = int(np.argmax(X.sum(1)))
    i1 = int(np.argmax(np.abs(X - X[i0]).sum(1)))
    c1, c2 = X[i0], X[i1]
    in_a = None
    for _ in range(iters):
        # Hamming similarity to a centroid c is sum(1 - c) + x . (2c - 1); the first term is the same for every x.
        score = X @ (2 * c1 - 1) - X @ (2 * c2 - 1)
        order = np.argsort(-score, kind="stable")
        new = np.zeros(N, bool)
        new[order[:na]] = True
        if in_a is not None and np.array_equal(new, in_a):
            break
        in_a = new
        c1, c2 = X[in_a].mean(0), X[~in_a].mean(0)
    a, b = np.flatnonzero(in_a), np.flatnonzero(~in_a)
    a, b = _swap_refine(X, a, b, max_swaps if max_swaps is not None else N)
    return np.sort(a), np.sort(b)


def _swap_refine(X, a, b, max_swaps: int):
    """Best-improvement pairwise swaps between the groups while one lowers the summed union cost."""
    a, b = a.copy(), b.copy()
    for _ in range(max_swaps):
        Xa, Xb = X[a], X[b]
        count_a, count_b = Xa.sum(0), Xb.sum(0)
        freed_a = Xa @ (count_a == 1)  # [na] bits only member i uses in a
        freed_b = Xb @ (count_b == 1)  # [nb]
        empty_a = (count_a[None] - Xa) == 0  # [na, P] bits a lacks once i leaves
        empty_b = (count_b[None] - Xb) == 0  # [nb, P]
        delta = (empty_a @ Xb.T - freed_a[:, None]) + (Xa @ empty_b.T - freed_b[None, :])  # [na, nb]
        i, j = np.unravel_index(np.argmin(delta), delta.shape)
        if delta[i, j] >= 0:
            break
        a[i], b[j] = b[j], a[i]
    return a, b


def form_batches(paths_NP: np.ndarray, batch_size: int, *, passes: int = 2) -> list[np.ndarray]:
    """Batches of `batch_size` (the last may be smaller) from a pool in arrival order, re-split pairwise with
    split_two: pairs (0, 1), (2, 3), ... then (1, 2), (3, 4), ..., `passes` times."""
    N = len(paths_NP)
    batches = [np.arange(s, min(s + batch_size, N)) for s in range(0, N, batch_size)]
    for p in range(passes * 2):
        for k in range(p % 2, len(batches) - 1, 2):
            pool = np.concatenate([batches[k], batches[k + 1]])
            if len(batches[k]) != len(batches[k + 1]):
                continue
            ia, ib = split_two(paths_NP[pool])
            batches[k], batches[k + 1] = pool[ia], pool[ib]
    return batches


def timed_split(paths_NP) -> tuple[np.ndarray, np.ndarray, float]:
    start = time.perf_counter()
    a, b = split_two(paths_NP)
    return a, b, time.perf_counter() - start


# Moving decode state with the sequences -----------------------------------------------------------------------------


@jax.jit
def _regroup(decode_a, decode_b, idx_a, idx_b):
    joined = jax.tree.map(lambda xa, xb: jnp.concatenate([xa, xb]), decode_a, decode_b)
    return jax.tree.map(lambda x: x[idx_a], joined), jax.tree.map(lambda x: x[idx_b], joined)


def regroup_states(state_a, state_b, idx_a, idx_b):
    """Re-splits two decode states (OffloadState) into two: new batch a holds the sequences idx_a of the joint batch
    (a's sequences first, then b's), new batch b holds idx_b. Every row keeps its own write position, so rows
    move with their caches unchanged."""
    da, db = state_a.decode, state_b.decode
    if da.kv_valid_BS.shape[1] != db.kv_valid_BS.shape[1]:
        raise RequestError(f"batches have different cache lengths {da.kv_valid_BS.shape[1]} and "
                           f"{db.kv_valid_BS.shape[1]}")
    new_a, new_b = _regroup(da, db, jnp.asarray(idx_a), jnp.asarray(idx_b))
    recent = np.concatenate([state_a.recent_BW, state_b.recent_BW])
    recent_valid = np.concatenate([state_a.recent_valid_BW, state_b.recent_valid_BW])
    return (OffloadState(decode=new_a, recent_BW=recent[idx_a], recent_valid_BW=recent_valid[idx_a]),
            OffloadState(decode=new_b, recent_BW=recent[idx_b], recent_valid_BW=recent_valid[idx_b]))


def next_token_paths(predictor, state, tokens_B) -> np.ndarray:
    """Each sequence's predicted routing path [B, L*E] for its next token (its top-k per layer)."""
    recent = np.concatenate([state.recent_BW[:, 1:], np.asarray(tokens_B, np.int32)[:, None]], axis=1)
    valid = np.concatenate([state.recent_valid_BW[:, 1:], np.ones((len(tokens_B), 1), bool)], axis=1)
    probs_BLE = np.asarray(predictor.probs(recent, valid))[:, -1]
    return topk_chosen(probs_BLE, predictor.config.top_k).reshape(len(tokens_B), -1)


def generate_two_batches(engine, ids, *, max_new_tokens: int | Sequence[int],
                         sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                         eos: int | None = None, regroup: bool = True, split: int | None = None,
                         cache_len: int | None = None):
    """Decodes prompts `ids` as two batches (ids[:split], ids[split:]; default split len // 2) that alternate
    steps on one OffloadEngine, as ExpertFlow's pending pool. With `regroup`, before every decode step the two
    batches' sequences are re-split by their predicted next-token routing paths (split_two) and their decode
    state (KV rows, positions, the predictor's recent tokens) and sampling rows move with them. max_new_tokens
    and sampling: one for all prompts or one per prompt; each request samples from its own stream
    (epsjax.generation), so its tokens equal the unscheduled generate's, greedy or sampled.

    Returns (GenerateResult, log) with the tokens per prompt in input order, and log = {"distinct_experts": per
    batch-step, summed over MoE layers (from the routers), "split_seconds": per re-split}."""
    n = len(ids)
    split = n // 2 if split is None else split
    if not 0 < split < n:
        raise RequestError(f"two batches need 0 < split < {n} prompts, got split={split}")
    max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
    every = SlotRows.build(params, max_new, eos, n + 1)  # row n: a finished row for batch padding
    groups = [list(ids[:split]), list(ids[split:])]
    # Each batch is padded as generate pads a request; one cache length holds both.
    shapes = [engine.request_shapes(group, max(max_new)) for group in groups]
    cache_len = cache_len or max(c for _, _, c in shapes)
    states, rows, owners = [], [], []
    out = [[] for _ in range(n)]
    tokens_per_expert, prompt_tokens = 0, 0

    def record(owner, tokens_B, emitted_B):
        for o, tok, em in zip(owner, np.asarray(tokens_B), np.asarray(emitted_B)):
            if o >= 0 and em:
                out[o].append(int(tok))

    start = time.perf_counter()
    for (tokens, mask, _), group, offset in zip(shapes, groups, (0, split)):
        B = tokens.shape[0]
        logits, state, stats = engine.prefill(tokens, mask, cache_len=cache_len, pad_rows=B - len(group))
        owner = np.full(B, -1)
        owner[:len(group)] = np.arange(offset, offset + len(group))
        tokens_B, emitted_B, batch_rows = _advance_rows(logits, jax.tree.map(lambda x: x[np.where(owner >= 0, owner, n)],
                                                                        every))
        record(owner, tokens_B, emitted_B)
        states.append(state)
        owners.append(owner)
        rows.append(batch_rows)
        tokens_per_expert = tokens_per_expert + np.asarray(stats.tokens_per_expert, np.int64)
        prompt_tokens += int(mask.sum())
    prefill_seconds = time.perf_counter() - start
    log = {"distinct_experts": [], "split_seconds": []}
    start = time.perf_counter()
    for _ in range(max(max_new) - 1):
        if all(np.asarray(r.finished_B).all() for r in rows):
            break
        if regroup:
            paths = np.concatenate([next_token_paths(engine.predictor, s, np.asarray(r.last_B)) & (o >= 0)[:, None]
                                    for s, r, o in zip(states, rows, owners)])
            ia, ib, seconds = timed_split(paths)
            log["split_seconds"].append(seconds)
            states = list(regroup_states(states[0], states[1], ia, ib))
            joint_rows = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), rows[0], rows[1])
            rows = [jax.tree.map(lambda x: x[ia], joint_rows), jax.tree.map(lambda x: x[ib], joint_rows)]
            joint_owner = np.concatenate(owners)
            owners = [joint_owner[ia], joint_owner[ib]]
        for k in range(2):
            logits, states[k], stats = engine.decode_step(states[k], np.asarray(rows[k].last_B))
            tokens_B, emitted_B, rows[k] = _advance_rows(logits, rows[k])
            record(owners[k], tokens_B, emitted_B)
            counts = np.asarray(stats.tokens_per_expert, np.int64)
            tokens_per_expert = tokens_per_expert + counts
            log["distinct_experts"].append(int((counts > 0).sum()))
    decode_seconds = time.perf_counter() - start
    result = GenerateResult(tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            prompt_tokens=prompt_tokens, generated_tokens=sum(map(len, out)),
                            tokens_per_expert=tokens_per_expert, dropped=0)
    return result, log
