"""How well a routing forecast matches the routing: per-token top-k recall and ExpertFlow's batch recall, against
the temporal-locality baseline (predict the previous step's experts).

Shapes: probs [N, T, L, E] predicted probabilities, ids [N, T, L, K] the routed experts (-1 for padding tokens).
Decode batches are `batch_size` consecutive sequences; step t of a batch routes one token per sequence.
"""

from __future__ import annotations

import numpy as np

from epsjax.offload.predictor import routing_targets


def topk_chosen(probs_NTLE: np.ndarray, top_k: int) -> np.ndarray:
    """Each token's top-k predicted experts as a multi-hot [N, T, L, E] bool."""
    top = np.argsort(-np.asarray(probs_NTLE), axis=-1, kind="stable")[..., :top_k]
    chosen = np.zeros(np.shape(probs_NTLE), bool)
    np.put_along_axis(chosen, top, True, axis=-1)
    return chosen


def topk_recall(probs_NTLE, ids_NTLK) -> np.ndarray:
    """Per layer [L]: the mean over valid tokens of |predicted top-k & routed top-k| / k."""
    ids = np.asarray(ids_NTLK)
    K = ids.shape[-1]
    valid_NT = ids[..., 0, 0] >= 0
    routed = routing_targets(ids, np.shape(probs_NTLE)[-1]).astype(bool)
    hits_NTL = (topk_chosen(probs_NTLE, K) & routed).sum(-1) / K
    return hits_NTL[valid_NT].mean(axis=0)


def _by_batch(x_NT_, batch_size: int) -> np.ndarray:
    """Unites [N, T, L, E] over consecutive groups of batch_size sequences: [N // batch_size, T, L, E]."""
    n = (x_NT_.shape[0] // batch_size) * batch_size
    return x_NT_[:n].reshape(n // batch_size, batch_size, *x_NT_.shape[1:]).any(axis=1)


def batch_recall(probs_NTLE, ids_NTLK, *, batch_size: int, start: int = 1) -> dict:
    """ExpertFlow's batch recall per layer for decode steps t >= start: the experts predicted for the batch (union of
    its tokens' top-k) against those its tokens were routed to, and the same for the temporal baseline (the experts
    of step t - 1). Also the mean number of experts per layer and step each method predicts, and the true one."""
    ids = np.asarray(ids_NTLK)
    K, E = ids.shape[-1], np.shape(probs_NTLE)[-1]
    true = _by_batch(routing_targets(ids, E).astype(bool), batch_size)[:, start:]  # [nb, T', L, E]
    pred = _by_batch(topk_chosen(probs_NTLE, K), batch_size)[:, start:]
    prev = _by_batch(routing_targets(ids, E).astype(bool), batch_size)[:, start - 1:-1]
    n_true = true.sum(axis=(0, 1, 3))
    steps = true.shape[0] * true.shape[1]
    return {
        "predictor_recall": (pred & true).sum(axis=(0, 1, 3)) / n_true,
        "temporal_recall": (prev & true).sum(axis=(0, 1, 3)) / n_true,
        "predictor_set_size": pred.sum(axis=(0, 1, 3)) / steps,
        "temporal_set_size": prev.sum(axis=(0, 1, 3)) / steps,
        "true_set_size": n_true / steps,
    }
