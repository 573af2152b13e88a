"""Replaying decode routing traces through the cache engine to compare placement policies, and (with a timing
model, timing.py) to estimate offloaded decode speed on a GPU.

Each batch of `batch_size` consecutive sequences decodes steps prompt_len..T-1; at every step every MoE layer demands
the experts its tokens were routed to. The forecast given to the engine before the step is one of: none (LRU, LFU),
the predictor's (the union of each token's predicted top-k, scored by probability), or the temporal baseline's (the
experts of the previous step). With `batches_in_flight=2` two batches alternate steps on one cache (a server with a
pending pool), and `regroup` re-splits their sequences before every step by predicted routing path (the token
scheduler, scheduler.split_two).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from epsjax.offload.cache import CacheStats, ExpertCacheEngine
from epsjax.offload.errors import OffloadError
from epsjax.offload.policies import make_policy
from epsjax.offload.predictor import routing_targets
from epsjax.offload.transfers import InstantTransfers


@dataclasses.dataclass
class ReplayResult:
    stats: CacheStats
    steps: int = 0                 # batch-steps replayed
    tokens: int = 0                # tokens decoded (valid sequences over all batch-steps)
    seconds: float = 0.0           # modelled time (timing given), else 0
    stall_seconds: float = 0.0     # of which the compute stream waited for copies
    copy_seconds: float = 0.0      # busy time of the copy engine
    distinct_experts: list = dataclasses.field(default_factory=list)  # per batch-step: summed over MoE layers

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")

    @property
    def mean_distinct_experts(self) -> float:
        return float(np.mean(self.distinct_experts)) if self.distinct_experts else float("nan")

    def as_dict(self) -> dict:
        return {"hit_ratio": self.stats.hit_ratio, "steps": self.steps, "tokens": self.tokens,
                "seconds": self.seconds, "tokens_per_s": self.tokens_per_s, "stall_seconds": self.stall_seconds,
                "copy_seconds": self.copy_seconds, "distinct_experts_per_step": self.mean_distinct_experts,
                "bytes_h2d_experts": self.stats.loads, "misses": self.stats.misses, "late": self.stats.late}


def topk_forecast(probs_NTLE, top_k: int):
    """Each token's predicted top-k experts and their probabilities: ids, scores [N, T, L, K]."""
    probs = np.asarray(probs_NTLE)
    ids = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    return ids.astype(np.int32), np.take_along_axis(probs, ids, axis=-1).astype(np.float32)


def step_forecast(pred_ids_BLK, pred_scores_BLK, num_experts: int) -> np.ndarray:
    """A step's forecast [L, E]: the union of its tokens' predicted experts, each scored by its highest
    probability (union_topk_scores on top-k already taken)."""
    B, L, K = pred_ids_BLK.shape
    out = np.zeros((L, num_experts))
    layer = np.broadcast_to(np.arange(L)[None, :, None], pred_ids_BLK.shape)
    np.maximum.at(out, (layer.reshape(-1), pred_ids_BLK.reshape(-1)), np.maximum(pred_scores_BLK, 1e-9).reshape(-1))
    return out


def replay(ids_NTLK, *, batch_size: int, num_slots: int, policy: str = "lru", forecast: str = "none",
           pred_ids_NTLK=None, pred_scores_NTLK=None, num_experts: int | None = None, prompt_len: int = 1,
           max_inflight: int = 1, keep: bool = True, split_hits: bool = True, timing=None,
           predictor_seconds: float = 0.0, batches_in_flight: int = 1, regroup: bool = False,
           max_batches: int | None = None) -> ReplayResult:
    """Replays decode steps through an ExpertCacheEngine.

    forecast: "none", "predictor" (needs pred_ids/pred_scores, e.g. from topk_forecast) or "temporal".
    timing: a timing.DecodeCosts to run the engine on a virtual clock (copies and compute priced), else transfers
        are instant and only the cache statistics mean anything.
    """
    from epsjax.offload import timing as timing_mod
    from epsjax.offload.scheduler import split_two

    ids = np.asarray(ids_NTLK)
    N, T, L, K = ids.shape
    E = num_experts or int(ids.max()) + 1
    if regroup and (batches_in_flight != 2 or forecast != "predictor"):
        raise OffloadError("regroup re-splits two batches in flight by predicted paths: batches_in_flight=2 and "
                           "forecast='predictor'")
    if timing is not None:
        clock = timing_mod.VirtualClock()
        transfers = timing_mod.VirtualTransfers(clock, timing.h2d_seconds())
    else:
        transfers = InstantTransfers()
    engine = ExpertCacheEngine(num_layers=L, num_experts=E, num_slots=num_slots, transfers=transfers,
                               policy=make_policy(policy), bytes_per_expert=1, max_inflight=max_inflight,
                               prefetch=forecast != "none", keep=keep, split_hits=split_hits)
    result = ReplayResult(stats=engine.stats)
    run = (lambda s: timing_mod.compute(engine, s)) if timing is not None else (lambda s: None)
    n_dense = 0 if timing is None else timing.cfg.num_layers - len(timing.cfg.moe_layers)
    group = batch_size * batches_in_flight
    starts = list(range(0, N - group + 1, group))[:max_batches]
    for start in starts:
        members = [np.arange(start + b * batch_size, start + (b + 1) * batch_size) for b in range(batches_in_flight)]
        for t in range(prompt_len, T):
            if regroup:
                pool = np.concatenate(members)
                paths = routing_targets(pred_ids_NTLK[pool, t], E).reshape(len(pool), L * E).astype(bool)
                a, b = split_two(paths)
                members = [pool[a], pool[b]]
            for seqs in members:
                step = ids[seqs, t]  # [B, L, K]
                valid = step[:, 0, 0] >= 0
                if not valid.any():
                    continue
                if forecast == "predictor":
                    pred = step_forecast(pred_ids_NTLK[seqs, t][valid], pred_scores_NTLK[seqs, t][valid], E)
                    run(predictor_seconds)
                elif forecast == "temporal":
                    prev = ids[seqs, t - 1][valid]
                    pred = np.zeros((L, E))
                    for layer in range(L):
                        pred[layer, np.unique(prev[:, layer][prev[:, layer] >= 0])] = 1.0
                else:
                    pred = None
                engine.begin_step(pred)
                run(n_dense * timing.dense_layer() if timing is not None else 0.0)
                distinct = 0
                for layer in range(L):
                    chosen, rows = np.unique(step[valid, layer], return_counts=True)
                    distinct += len(chosen)
                    rows_of = dict(zip(chosen.tolist(), rows.tolist()))
                    run(timing.attention() if timing is not None else 0.0)
                    for table in engine.demand(layer, chosen):
                        if timing is not None:
                            run(timing.experts([rows_of[e] for e in np.flatnonzero(table >= 0)]))
                    run(timing.finish() if timing is not None else 0.0)
                    engine.end_layer(layer)
                engine.end_step()
                run(timing.head() if timing is not None else 0.0)
                result.steps += 1
                result.tokens += int(valid.sum())
                result.distinct_experts.append(distinct)
    if timing is not None:
        result.seconds, result.stall_seconds = clock.now, clock.stall
        result.copy_seconds = transfers.copy_seconds
    return result


def replay_device(ids_NTLK, timing, *, batch_size: int, prompt_len: int = 1, num_experts: int | None = None,
                  max_batches: int | None = None) -> ReplayResult:
    """Every expert resident on the device (no copies): the upper bound, with the same compute pricing."""
    ids = np.asarray(ids_NTLK)
    N, T, L, K = ids.shape
    E = num_experts or int(ids.max()) + 1
    result = ReplayResult(stats=CacheStats())
    for start in list(range(0, N - batch_size + 1, batch_size))[:max_batches]:
        for t in range(prompt_len, T):
            step = ids[start:start + batch_size, t]
            valid = step[:, 0, 0] >= 0
            if not valid.any():
                continue
            rows_LE = np.stack([np.bincount(step[valid, layer].reshape(-1), minlength=E) for layer in range(L)])
            result.seconds += timing.device_step(rows_LE)
            result.steps += 1
            result.tokens += int(valid.sum())
            result.distinct_experts.append(int((rows_LE > 0).sum()))
    return result


def replay_decode(ids_NTLK, *, batch_size: int, num_slots: int, policy: str = "lru", forecast: str = "none",
                  probs_NTLE=None, prompt_len: int = 1, max_inflight: int = 1) -> CacheStats:
    """Hit-ratio replay (instant transfers) with the predictor's per-token probabilities [N, T, L, E]."""
    pred_ids = pred_scores = None
    E = None
    if probs_NTLE is not None:
        E = np.shape(probs_NTLE)[-1]
        pred_ids, pred_scores = topk_forecast(probs_NTLE, np.shape(ids_NTLK)[-1])
    return replay(ids_NTLK, batch_size=batch_size, num_slots=num_slots, policy=policy, forecast=forecast,
                  pred_ids_NTLK=pred_ids, pred_scores_NTLK=pred_scores, num_experts=E, prompt_len=prompt_len,
                  max_inflight=max_inflight).stats
