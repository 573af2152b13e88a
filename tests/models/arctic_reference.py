"""A plain numpy Snowflake Arctic forward pass, read straight from an HF-layout checkpoint by tensor name.

It follows the Hub's remote code (modeling_arctic.py) with loops over experts and tokens, sharing no code with
models/: attention -> residual; a dense residual MLP on the attention output; the MoE on the layer *input*
(parallel_attn_mlp_res), softmax top-k renormalised.
"""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _silu(x):
    return x / (1 + np.exp(-x))


def _mlp(x, w1, w3, w2):  # HF linears are [out, in]
    return (_silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def _rope(x, positions, theta):  # x [T, N, H], rotate-half layout
    H = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, H, 2) / H)
    ang = positions[:, None] * inv[None]  # [T, H/2]
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., : H // 2], x[..., H // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def arctic_logits(path, tokens):
    """Logits [T, V] (float64) for one unpadded sequence of token ids."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    eps, N, K = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    H, E, top_k = cfg["head_dim"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    theta = cfg["rope_parameters"]["rope_theta"]
    T = len(tokens)
    positions = np.arange(T, dtype=np.float64)
    x = w["model.embed_tokens.weight"][np.asarray(tokens)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = (h @ w[p + "self_attn.q_proj.weight"].T).reshape(T, N, H)
        k = (h @ w[p + "self_attn.k_proj.weight"].T).reshape(T, K, H)
        v = (h @ w[p + "self_attn.v_proj.weight"].T).reshape(T, K, H)
        q, k = _rope(q, positions, theta), _rope(k, positions, theta)
        out = np.zeros((T, N, H))
        for n in range(N):
            kv = n // (N // K)
            scores = q[:, n] @ k[:, kv].T / np.sqrt(H)
            scores = np.where(np.tril(np.ones((T, T))) > 0, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[:, n] = probs @ v[:, kv]
        attn = out.reshape(T, N * H) @ w[p + "self_attn.o_proj.weight"].T
        residual_attn = x + attn
        dense = _mlp(_rms(residual_attn, w[p + "residual_layernorm.weight"], eps), w[p + "residual_mlp.w1.weight"],
                     w[p + "residual_mlp.w3.weight"], w[p + "residual_mlp.w2.weight"])
        moe_in = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        logits = moe_in @ w[p + "block_sparse_moe.gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        moe = np.zeros_like(x)
        for t in range(T):
            chosen = np.argsort(-probs[t])[:top_k]
            weights = probs[t, chosen] / probs[t, chosen].sum()
            for e, g in zip(chosen, weights):
                ep = p + f"block_sparse_moe.experts.{e}."
                moe[t] += g * _mlp(moe_in[t], w[ep + "w1.weight"], w[ep + "w3.weight"], w[ep + "w2.weight"])
        x = residual_attn + dense + moe
    x = _rms(x, w["model.norm.weight"], eps)
    assert E == w["model.layers.0.block_sparse_moe.gate.weight"].shape[0]
    return x @ w["lm_head.weight"].T
