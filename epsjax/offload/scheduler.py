"""The token scheduler: regroups pending sequences into batches whose routing paths overlap, so a batch activates
fewer distinct experts (fewer transfers, more tokens per expert).

A sequence's routing path is a bit vector of length L*E: the experts its next token is predicted (or known) to use
in every MoE layer. ExpertFlow's step takes two adjacent batches and re-splits their sequences into two equal halves
minimising the summed union of experts. `split_two` does it as a balanced two-cluster k-means on the Hamming
similarity of paths (the half nearest centroid 1 relative to centroid 2 forms group 1), then pairwise swaps while a
swap lowers the exact union cost. `form_batches` applies it to adjacent pairs of a larger pool.

`regroup_states` moves the sequences' decode state with them: KV cache rows, valid-slot masks, rotary positions and
the predictor's recent tokens. Prompts are left-padded, so a batch shares one write index; when two batches' write
indices differ, the one behind is shifted right (its first slots become padding), which changes no attention score
(keys carry their rotary positions; padding slots are masked).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from epsjax.engine import DecodeState, GenerateResult, SamplingParams, sample
from epsjax.offload.metrics import topk_chosen
from epsjax.offload.state import OffloadState


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
def _regroup(cache_a, cache_b, kv_a_BS, kv_b_BS, pos_a_B, pos_b_B, shift_a, shift_b, idx_a, idx_b):
    def shifted(x, shift):
        return jnp.roll(x, shift, axis=1)  # slots rolled in from the end are unwritten, so padding

    joined = jax.tree.map(lambda xa, xb: jnp.concatenate([shifted(xa, shift_a), shifted(xb, shift_b)]),
                          cache_a, cache_b)
    kv = jnp.concatenate([shifted(kv_a_BS, shift_a), shifted(kv_b_BS, shift_b)])
    pos = jnp.concatenate([pos_a_B, pos_b_B])
    def take(idx):
        return jax.tree.map(lambda x: x[idx], joined), kv[idx], pos[idx]

    return take(idx_a), take(idx_b)


def regroup_states(state_a, state_b, idx_a, idx_b):
    """Re-splits two decode states (OffloadState) into two: new batch a holds the sequences idx_a of the joint batch
    (a's sequences first, then b's), new batch b holds idx_b. Both keep the later of the two write indices."""
    da, db = state_a.decode, state_b.decode
    if da.kv_valid_BS.shape[1] != db.kv_valid_BS.shape[1]:
        raise ValueError(f"batches have different cache lengths {da.kv_valid_BS.shape[1]} and "
                         f"{db.kv_valid_BS.shape[1]}")
    wa, wb = int(da.write_index), int(db.write_index)
    w = max(wa, wb)
    (ca, kva, pa), (cb, kvb, pb) = _regroup(da.cache, db.cache, da.kv_valid_BS, db.kv_valid_BS, da.next_position_B,
                                            db.next_position_B, jnp.int32(w - wa), jnp.int32(w - wb),
                                            jnp.asarray(idx_a), jnp.asarray(idx_b))
    recent = np.concatenate([state_a.recent_BW, state_b.recent_BW])
    recent_valid = np.concatenate([state_a.recent_valid_BW, state_b.recent_valid_BW])
    write = jnp.asarray(w, jnp.int32)
    active = np.concatenate([np.asarray(da.active_B), np.asarray(db.active_B)])
    def make(c, kv, p, idx):
        return OffloadState(decode=DecodeState(cache=c, kv_valid_BS=kv, next_position_B=p, write_index=write,
                                               active_B=jnp.asarray(active[idx])),
                            recent_BW=recent[idx], recent_valid_BW=recent_valid[idx])

    return make(ca, kva, pa, idx_a), make(cb, kvb, pb, idx_b)


def next_token_paths(predictor, state, tokens_B) -> np.ndarray:
    """Each sequence's predicted routing path [B, L*E] for its next token (its top-k per layer)."""
    recent = np.concatenate([state.recent_BW[:, 1:], np.asarray(tokens_B, np.int32)[:, None]], axis=1)
    valid = np.concatenate([state.recent_valid_BW[:, 1:], np.ones((len(tokens_B), 1), bool)], axis=1)
    probs_BLE = np.asarray(predictor.probs(recent, valid))[:, -1]
    return topk_chosen(probs_BLE, predictor.config.top_k).reshape(len(tokens_B), -1)


def _sample_rows(logits_BV, key, owners_B: np.ndarray, step: int, sampling):
    """Next tokens [B]: greedy as the Engine; with temperature > 0 each sequence draws from its own stream
    (key, its index, step), so a token does not depend on which batch its sequence sits in."""
    if sampling.temperature == 0:
        return np.asarray(sample(logits_BV, key, sampling), np.int32)
    keys = jax.vmap(lambda o: jax.random.fold_in(jax.random.fold_in(key, o), step))(
        jnp.asarray(np.maximum(owners_B, 0)))
    return np.asarray(jax.vmap(lambda row_V, k: sample(row_V[None], k, sampling)[0])(logits_BV, keys), np.int32)


def generate_two_batches(engine, ids, *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
                         eos: int | None = None, regroup: bool = True, split: int | None = None,
                         cache_len: int | None = None):
    """Decodes prompts `ids` as two batches (ids[:split], ids[split:]; default split len // 2) that alternate
    steps on one OffloadEngine, as ExpertFlow's pending pool. With `regroup`, before every decode step the two
    batches' sequences are re-split by their predicted next-token routing paths (split_two) and their decode
    state (KV rows, positions, the predictor's recent tokens) moves with them.

    Returns (GenerateResult, log) with the tokens per prompt in input order, and log = {"distinct_experts": per
    batch-step, summed over MoE layers (from the routers), "split_seconds": per re-split}."""
    n = len(ids)
    split = n // 2 if split is None else split
    if not 0 < split < n:
        raise ValueError(f"two batches need 0 < split < {n} prompts, got split={split}")
    groups = [list(ids[:split]), list(ids[split:])]
    # Each batch is padded as generate pads a request (its own prompt length: their write indices may differ,
    # and regroup_states shifts the one behind); one cache length holds both.
    shapes = [engine.request_shapes(group, max_new_tokens) for group in groups]
    cache_len = cache_len or max(c for _, _, c in shapes)
    key = jax.random.key(sampling.seed)
    states, nexts, owners = [], [], []
    tokens_per_expert, prompt_tokens = 0, 0
    start = time.perf_counter()
    for (tokens, mask, _), group, offset in zip(shapes, groups, (0, split)):
        B = tokens.shape[0]
        logits, state, stats = engine.prefill(tokens, mask, cache_len=cache_len, pad_rows=B - len(group))
        owner = np.full(B, -1)
        owner[:len(group)] = np.arange(offset, offset + len(group))
        states.append(state)
        owners.append(owner)
        nexts.append(_sample_rows(logits, key, owner, 0, sampling))
        tokens_per_expert = tokens_per_expert + np.asarray(stats.tokens_per_expert, np.int64)
        prompt_tokens += int(mask.sum())
    prefill_seconds = time.perf_counter() - start
    out = [[] for _ in range(n)]
    done = np.zeros(n, bool)
    log = {"distinct_experts": [], "split_seconds": []}
    start = time.perf_counter()
    for step in range(max_new_tokens):
        for owner, nxt in zip(owners, nexts):
            for o, tok in zip(owner, nxt):
                if o >= 0 and not done[o]:
                    out[o].append(int(tok))
                    done[o] = eos is not None and int(tok) == eos
        if step == max_new_tokens - 1 or done.all():
            break
        if regroup:
            paths = np.concatenate([next_token_paths(engine.predictor, s, x) & (o >= 0)[:, None]
                                    for s, x, o in zip(states, nexts, owners)])
            ia, ib, seconds = timed_split(paths)
            log["split_seconds"].append(seconds)
            states = list(regroup_states(states[0], states[1], ia, ib))
            joint_next, joint_owner = np.concatenate(nexts), np.concatenate(owners)
            nexts, owners = [joint_next[ia], joint_next[ib]], [joint_owner[ia], joint_owner[ib]]
        for k in range(2):
            logits, states[k], stats = engine.decode_step(states[k], nexts[k])
            nexts[k] = _sample_rows(logits, key, owners[k], step + 1, sampling)
            counts = np.asarray(stats.tokens_per_expert, np.int64)
            tokens_per_expert = tokens_per_expert + counts
            log["distinct_experts"].append(int((counts > 0).sum()))
    decode_seconds = time.perf_counter() - start
    result = GenerateResult(tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                            prompt_tokens=prompt_tokens, generated_tokens=sum(map(len, out)),
                            tokens_per_expert=tokens_per_expert, dropped=0)
    return result, log
