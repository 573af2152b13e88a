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


def router_statistics(ids_NTLK, num_experts: int) -> dict:
    """How much structure a model's routing has, per MoE layer [L] (valid tokens only):

    load_entropy      entropy of the experts' share of the assignments / log(E): 1 = perfectly balanced load
    repeat            P(an expert of token t+1 was also chosen by token t), same sequence; K/E without memory
    repeat_chance     the same for two independent tokens with the layer's load p: ~ K * sum_e p_e^2
    next_layer_top1   how well layer l's top-1 expert predicts layer l+1's: accuracy of the best lookup table
                      (the most frequent next-layer expert for each expert), over [L-1] layer pairs
    next_layer_chance the same with no information (the next layer's most frequent expert)
    """
    ids = np.asarray(ids_NTLK)
    N, T, L, K = ids.shape
    valid = ids[..., 0, 0] >= 0  # [N, T]
    out = {"load_entropy": [], "repeat": [], "repeat_chance": [], "next_layer_top1": [], "next_layer_chance": []}
    for layer in range(L):
        chosen = ids[:, :, layer][valid]  # [M, K]
        p = np.bincount(chosen.reshape(-1), minlength=num_experts) / chosen.size
        nz = p[p > 0]
        out["load_entropy"].append(float(-(nz * np.log(nz)).sum() / np.log(num_experts)))
        both = valid[:, 1:] & valid[:, :-1]
        now, before = ids[:, 1:, layer][both], ids[:, :-1, layer][both]  # [M', K]
        shared = (now[:, :, None] == before[:, None, :]).any(-1).mean()
        out["repeat"].append(float(shared))
        # two independent tokens with this load: P(a given expert of one is among the other's K) ~ K * sum p^2
        out["repeat_chance"].append(float(min(1.0, K * (p ** 2).sum())))
    for layer in range(L - 1):
        a, b = ids[:, :, layer, 0][valid], ids[:, :, layer + 1, 0][valid]
        table = np.zeros((num_experts, num_experts), np.int64)
        np.add.at(table, (a, b), 1)
        out["next_layer_top1"].append(float(table.max(axis=1).sum() / len(a)))
        out["next_layer_chance"].append(float(np.bincount(b, minlength=num_experts).max() / len(b)))
    return out
