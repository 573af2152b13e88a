"""The routing-path predictor: a small Flax model that forecasts, from the tokens alone and before the first MoE layer
runs, which experts every MoE layer will route each token to.

Architecture (ExpertFlow's shape, sized to train in seconds on a CPU):

    encoder   token embedding + previous-token embedding, then `enc_layers` pre-norm blocks of causal self-attention
              over a local window of W tokens (no position embeddings: a token's routing depends on recent context,
              and decode sees exactly the last W tokens) and a GELU MLP
    decoder   one light head per MoE layer: (h + layer embedding) -> shared GELU projection -> that layer's [H, E]
              output matrix
    output    logits [B, S, L, E] in one pass; sigmoid gives per-expert routing probabilities

Training is multi-label classification: binary cross-entropy against each token's routing matrix (1 for the top-k
experts it was routed to in each layer), optax AdamW, on traces collected by running the model (traces.py).
A forecast for a step is the union over its tokens of each token's top-k predicted experts (`union_topk_scores`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from epsjax.files import read_json
from epsjax.offload.errors import OffloadError


@dataclasses.dataclass(frozen=True)
class PredictorConfig:
    vocab_size: int
    num_layers: int       # MoE layers
    num_experts: int
    top_k: int
    d_model: int = 64
    num_heads: int = 4
    enc_layers: int = 2
    head_dim: int = 64    # hidden width of the per-layer heads
    window: int = 64      # tokens of context the encoder attends to (decode keeps the last `window` tokens)

    @classmethod
    def for_model(cls, cfg, **overrides) -> "PredictorConfig":
        return cls(vocab_size=cfg.vocab_size, num_layers=len(cfg.moe_layers), num_experts=cfg.num_experts,
                   top_k=cfg.router.top_k, **overrides)


class _Block(nnx.Module):
    def __init__(self, c: PredictorConfig, *, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(c.num_heads, c.d_model, decode=False, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.up = nnx.Linear(c.d_model, 4 * c.d_model, rngs=rngs)
        self.down = nnx.Linear(4 * c.d_model, c.d_model, rngs=rngs)

    def __call__(self, x_BSD, mask_B1SS):
        x_BSD = x_BSD + self.attn(self.attn_norm(x_BSD), mask=mask_B1SS)
        return x_BSD + self.down(jax.nn.gelu(self.up(self.mlp_norm(x_BSD))))


class RoutingPredictorModel(nnx.Module):
    """tokens [B, S] (+ valid [B, S]) -> routing logits [B, S, L, E]."""

    def __init__(self, config: PredictorConfig, *, rngs: nnx.Rngs):
        c = self.config = config
        self.tok = nnx.Embed(c.vocab_size, c.d_model, rngs=rngs)
        self.prev = nnx.Embed(c.vocab_size + 1, c.d_model, rngs=rngs)  # id vocab_size: no previous token
        self.blocks = nnx.List([_Block(c, rngs=rngs) for _ in range(c.enc_layers)])
        self.norm = nnx.RMSNorm(c.d_model, rngs=rngs)
        self.layer_LD = nnx.Param(0.02 * jax.random.normal(rngs.params(), (c.num_layers, c.d_model)))
        self.hidden = nnx.Linear(c.d_model, c.head_dim, rngs=rngs)
        self.out_LHE = nnx.Param(jax.random.normal(rngs.params(), (c.num_layers, c.head_dim, c.num_experts))
                                 * c.head_dim ** -0.5)
        self.bias_LE = nnx.Param(jnp.zeros((c.num_layers, c.num_experts)))

    def __call__(self, tokens_BS, valid_BS):
        c = self.config
        B, S = tokens_BS.shape
        prev_BS = jnp.concatenate([jnp.full((B, 1), c.vocab_size), tokens_BS[:, :-1]], axis=1)
        prev_valid_BS = jnp.concatenate([jnp.zeros((B, 1), bool), valid_BS[:, :-1]], axis=1)
        x_BSD = self.tok(tokens_BS) + self.prev(jnp.where(prev_valid_BS, prev_BS, c.vocab_size))
        i, j = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
        local_SS = (j <= i) & (j > i - c.window)
        mask_B1SS = (local_SS[None] & valid_BS[:, None, :])[:, None]
        mask_B1SS = mask_B1SS | jnp.eye(S, dtype=bool)[None, None]  # padding queries attend to themselves
        for block in self.blocks:
            x_BSD = block(x_BSD, mask_B1SS)
        h_BSLD = self.norm(x_BSD)[:, :, None, :] + self.layer_LD[...]
        z_BSLH = jax.nn.gelu(self.hidden(h_BSLD))
        return jnp.einsum("BSLH,LHE->BSLE", z_BSLH, self.out_LHE[...]) + self.bias_LE[...]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _probs(graphdef, state, tokens_BS, valid_BS):
    return jax.nn.sigmoid(nnx.merge(graphdef, state)(tokens_BS, valid_BS))


def union_topk_scores(probs_NLE: np.ndarray, top_k: int) -> np.ndarray:
    """A step's forecast [L, E] from per-token probabilities [N, L, E]: each token's top-k experts per layer, united
    over the tokens; the score of a predicted expert is its highest probability, 0 for the others."""
    probs_NLE = np.asarray(probs_NLE, np.float64)
    N, L, E = probs_NLE.shape
    scores_LE = np.zeros((L, E))
    if N == 0:
        return scores_LE
    top_NLK = np.argsort(-probs_NLE, axis=-1, kind="stable")[..., :top_k]
    chosen_NLE = np.zeros((N, L, E), bool)
    np.put_along_axis(chosen_NLE, top_NLK, True, axis=-1)
    return np.max(np.where(chosen_NLE, np.maximum(probs_NLE, 1e-9), 0.0), axis=0)


class RoutingPredictor:
    """A trained predictor ready for the runtime: probabilities, step forecasts, save and load."""

    def __init__(self, model: RoutingPredictorModel):
        self.config = model.config
        self.model = model
        self.graphdef, self.state = nnx.split(model)

    def probs(self, tokens_BS, valid_BS=None) -> jax.Array:
        """Routing probabilities [B, S, L, E]."""
        tokens_BS = jnp.asarray(tokens_BS, jnp.int32)
        valid_BS = jnp.ones(tokens_BS.shape, bool) if valid_BS is None else jnp.asarray(valid_BS, bool)
        return _probs(self.graphdef, self.state, tokens_BS, valid_BS)

    def expert_scores(self, tokens_BS, valid_BS, *, last_only: bool) -> np.ndarray:
        """The forecast [L, E] for a forward over these tokens (decode: only the last position is new)."""
        probs_BSLE = np.asarray(self.probs(tokens_BS, valid_BS))
        valid_BS = np.asarray(valid_BS, bool)
        if last_only:
            return union_topk_scores(probs_BSLE[:, -1], self.config.top_k)
        return union_topk_scores(probs_BSLE[valid_BS], self.config.top_k)

    def save(self, path) -> pathlib.Path:
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "predictor_config.json").write_text(json.dumps(dataclasses.asdict(self.config), indent=1))
        save_file({k: np.asarray(v) for k, v in _flat(self.state).items()}, str(path / "predictor.safetensors"))
        return path

    @classmethod
    def load(cls, path) -> "RoutingPredictor":
        """The predictor RoutingPredictor.save wrote to `path`. A file that cannot be read, a predictor_config.json
        that is not a JSON object of PredictorConfig's positive integer fields, or a predictor.safetensors whose
        tensors (names and shapes, from its header) are not that config's is an OffloadError naming the file; the
        model is built only after its sizes match the tensors."""
        path = pathlib.Path(path)
        config_file, weights = path / "predictor_config.json", path / "predictor.safetensors"
        fields = read_json(config_file, "the predictor config", OffloadError)
        names = [f.name for f in dataclasses.fields(PredictorConfig)]
        if not isinstance(fields, dict) or set(fields) - set(names) or not set(names[:4]) <= set(fields):
            raise OffloadError(f"{config_file}: must be a JSON object with fields {', '.join(names[:4])} (and "
                               f"optionally {', '.join(names[4:])}), got {fields!r:.200}")
        bad = [f"{k}={v!r}" for k, v in fields.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise OffloadError(f"{config_file}: fields must be positive integers: {', '.join(bad)}")
        config = PredictorConfig(**fields)
        try:
            with safe_open(str(weights), framework="numpy") as f:
                held = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors' errors carry no file name
            raise OffloadError(f"{weights}: cannot be read as safetensors: {e}") from None
        blocks = {name.split(".")[1] for name in held if name.startswith("blocks.")}
        if config.enc_layers != len(blocks):  # before the model is built: enc_layers sets its size
            raise OffloadError(f"{config_file} declares enc_layers={config.enc_layers}, but {weights.name} holds "
                               f"{len(blocks)} encoder blocks")
        abstract = nnx.eval_shape(lambda: RoutingPredictorModel(config, rngs=nnx.Rngs(0)))
        shapes = {name: tuple(v.shape) for name, v in _flat(nnx.state(abstract)).items()}
        if shapes != held:
            diff = sorted(n for n in set(shapes) | set(held) if shapes.get(n) != held.get(n))[:4]
            raise OffloadError(f"{weights}: predictor tensors do not match {config_file.name}: "
                               + "; ".join(f"{n} {held.get(n)} in the file, {shapes.get(n)} by the config"
                                           for n in diff))
        model = RoutingPredictorModel(config, rngs=nnx.Rngs(0))
        tensors = load_file(str(weights))
        state = nnx.state(model)
        leaves = jax.tree_util.tree_leaves_with_path(state)
        new = [jnp.asarray(tensors[_name(p)]) for p, _ in leaves]
        nnx.update(model, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), new))
        return cls(model)


def _name(path) -> str:
    return ".".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def _flat(state) -> dict[str, jax.Array]:
    return {_name(p): v for p, v in jax.tree_util.tree_leaves_with_path(state)}


# Training --------------------------------------------------------------------------------------------------------


def routing_targets(ids_NTLK: np.ndarray, num_experts: int) -> np.ndarray:
    """Multi-hot routing matrices [N, T, L, E] (float32) from expert ids [N, T, L, K] (-1 = padding)."""
    ids = np.asarray(ids_NTLK)
    onehot = (ids[..., None] == np.arange(num_experts)) & (ids[..., None] >= 0)
    return onehot.any(axis=-2).astype(np.float32)


def _loss(model, tokens_BS, valid_BS, targets_BSLE):
    logits = model(tokens_BS, valid_BS)
    bce_BSLE = optax.sigmoid_binary_cross_entropy(logits, targets_BSLE)
    per_token = bce_BSLE.mean(axis=(-2, -1))
    return jnp.sum(per_token * valid_BS) / jnp.maximum(valid_BS.sum(), 1)


@nnx.jit
def _train_step(model, optimizer, tokens_BS, valid_BS, targets_BSLE):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens_BS, valid_BS, targets_BSLE)
    optimizer.update(model, grads)
    return loss


def train_predictor(tokens_NT, ids_NTLK, config: PredictorConfig, *, valid_NT=None, steps: int = 400,
                    batch_size: int = 32, learning_rate: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
                    log=None) -> tuple[RoutingPredictor, dict]:
    """Trains a predictor on routing traces: tokens [N, T], expert ids [N, T, L, K] (-1 where invalid).
    Returns the predictor and a history {"loss": [...], "seconds": float}."""
    tokens_NT = np.asarray(tokens_NT, np.int32)
    valid_NT = (np.asarray(ids_NTLK)[..., 0, 0] >= 0) if valid_NT is None else np.asarray(valid_NT, bool)
    targets = routing_targets(ids_NTLK, config.num_experts)
    if targets.shape[2] != config.num_layers:
        raise OffloadError(f"traces have {targets.shape[2]} MoE layers, the predictor config {config.num_layers}")
    model = RoutingPredictorModel(config, rngs=nnx.Rngs(seed))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(steps // 20, 1), steps)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=weight_decay), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    N = tokens_NT.shape[0]
    losses, start = [], time.perf_counter()
    for step in range(steps):
        idx = rng.choice(N, size=min(batch_size, N), replace=False)
        loss = _train_step(model, optimizer, jnp.asarray(tokens_NT[idx]), jnp.asarray(valid_NT[idx]),
                           jnp.asarray(targets[idx]))
        if step % 50 == 0 or step == steps - 1:
            losses.append((step, float(loss)))
            if log:
                log(f"step {step}: loss {float(loss):.4f}")
    return RoutingPredictor(model), {"loss": losses, "seconds": time.perf_counter() - start}
