"""Inference entry points: jitted prefill and decode_step over a KV cache, sampling, and generate.

Prompts of different lengths are left-padded into one batch: padding slots are masked out of attention and of
the MoE (no expert computes a padding token), and rotary positions count real tokens only, as transformers does.
Bad requests (empty batch or prompt, token ids outside the vocabulary, prompts that do not fit the cache) raise
ValueError before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import ExpertCompute, LocalExperts, MoEStats, MoETransformer
from models.transformer import decode_mask, prefill_mask


DECODE_CHUNK = 32  # decode steps per device call in generate: the host sees the tokens once per chunk


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; otherwise sample from softmax(logits / temperature) restricted to the top-p mass."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: list[dict]          # per layer, [B, S, ...] each
    kv_valid_BS: jax.Array     # [B, S] bool: slots holding real tokens
    next_position_B: jax.Array  # [B] int32 rotary position of the next token
    write_index: jax.Array     # [] int32 next cache slot (shared by the batch: prompts are left-padded)


jax.tree_util.register_dataclass(
    DecodeState, data_fields=["cache", "kv_valid_BS", "next_position_B", "write_index"], meta_fields=[])


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]           # new tokens per prompt (stopping at and including EOS)
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int                # real (unpadded) prompt tokens
    generated_tokens: int
    tokens_per_expert: np.ndarray     # [L_moe, E] routed assignments over the whole request
    dropped: int                      # assignments dropped by a capacity limit (0 when dropless)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else float("nan")


def sample(logits_BV, key, sampling: SamplingParams):
    """Next tokens [B] int32 from last-position logits [B, V]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
    if sampling.top_p < 1:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        threshold_B1 = jnp.min(jnp.where(mass_before_BV < sampling.top_p, sorted_BV, jnp.inf), axis=-1,
                               keepdims=True)
        logits_BV = jnp.where(logits_BV >= threshold_B1, logits_BV, -jnp.inf)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class Engine:
    """A model ready to serve: parameters split from the module graph, jitted prefill and decode_step.

    experts: how the routed experts run (default: all on this device, load-aware kernel selection).
    batch_sharding: optional sharding for [B, ...] inputs (e.g. data parallel over a mesh's "data" axis).
    """

    def __init__(self, model: MoETransformer, *, experts: ExpertCompute = LocalExperts(),
                 batch_sharding: jax.sharding.Sharding | None = None, decode_chunk: int = DECODE_CHUNK):
        if not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise ValueError(f"decode_chunk must be a positive int, got {decode_chunk!r}")
        self.cfg = model.cfg
        self.graphdef, self.params = nnx.split(model)
        self.experts = experts
        self.batch_sharding = batch_sharding
        self.decode_chunk = decode_chunk
        options = compiler_options(experts)
        self._prefill = jax.jit(_prefill, static_argnames=_PREFILL_STATIC, compiler_options=options)
        self._step = jax.jit(_decode_step, static_argnames=("graphdef", "experts"), donate_argnames=("state",),
                             compiler_options=options)
        self._decode_loop = jax.jit(_decode_loop, static_argnames=("graphdef", "experts", "sampling", "eos", "chunk",
                                                                     "stats_shape"),
                                    donate_argnames=("state",), compiler_options=options)

    # Validation ------------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens: np.ndarray, what: str) -> None:
        bad = tokens[(tokens < 0) | (tokens >= self.cfg.vocab_size)]
        if bad.size:
            raise ValueError(f"{what} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): "
                             f"{sorted(set(bad.tolist()))[:10]}")

    def pad_prompts(self, prompts: Sequence[Sequence[int]], *, multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
        """Left-pads prompts to one length (rounded up to `multiple` to reuse compilations): tokens, mask [B, T]."""
        if len(prompts) == 0:
            raise ValueError("empty batch: give at least one prompt")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise ValueError(f"prompts {empty} are empty: every prompt needs at least one token")
        T = max(len(p) for p in prompts)
        T = min(math.ceil(T / multiple) * multiple, max(T, self.cfg.max_seq_len))
        tokens = np.full((len(prompts), T), self.cfg.pad_token_id, np.int32)
        mask = np.zeros((len(prompts), T), bool)
        for i, p in enumerate(prompts):
            tokens[i, T - len(p):] = np.asarray(p, np.int64)
            mask[i, T - len(p):] = True
        self._check_tokens(np.asarray([t for p in prompts for t in p], np.int64), "prompt")
        return tokens, mask

    def check_prefill_inputs(self, tokens_BT, mask_BT, cache_len: int | None):
        """Host-side checks of a prefill request: tokens [B, T] (int32), mask [B, T] (bool), the cache length."""
        tokens_BT = np.asarray(tokens_BT)
        if tokens_BT.ndim != 2 or tokens_BT.shape[0] == 0 or tokens_BT.shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [batch, length] array, got shape {tokens_BT.shape}")
        self._check_tokens(tokens_BT, "tokens")
        mask_BT = np.ones(tokens_BT.shape, bool) if mask_BT is None else np.asarray(mask_BT, bool)
        if mask_BT.shape != tokens_BT.shape:
            raise ValueError(f"attention mask shape {mask_BT.shape} differs from tokens shape {tokens_BT.shape}")
        cache_len = cache_len or self.cfg.max_seq_len
        if tokens_BT.shape[1] > cache_len:
            raise ValueError(f"prompt length {tokens_BT.shape[1]} exceeds the cache length {cache_len}")
        return tokens_BT, mask_BT, cache_len

    # Jitted steps ----------------------------------------------------------------------------------------------

    def prefill(self, tokens_BT, mask_BT=None, *, cache_len: int | None = None, all_logits: bool = False):
        """Runs the prompts; returns (logits, state, moe_stats). logits is [B, V] for the last position, or
        [B, T, V] with all_logits; moe_stats counts tokens per expert per MoE layer. The cache holds cache_len
        slots (default: the model's max_seq_len)."""
        tokens_BT, mask_BT, cache_len = self.check_prefill_inputs(tokens_BT, mask_BT, cache_len)
        tokens_BT, mask_BT = self._place(tokens_BT), self._place(mask_BT)
        return self._prefill(self.graphdef, self.params, tokens_BT, mask_BT, experts=self.experts,
                             cache_len=cache_len, all_logits=all_logits)

    def decode_step(self, state: DecodeState, tokens_B):
        """Feeds one token per sequence; returns (logits [B, V], state, moe_stats). `state` is consumed."""
        tokens_B = np.asarray(tokens_B, np.int32)
        self._check_tokens(tokens_B, "tokens")
        cache_len = state.kv_valid_BS.shape[1]
        if int(state.write_index) >= cache_len:
            raise ValueError(f"the KV cache is full ({cache_len} slots); prefill with a larger cache_len")
        return self._step(self.graphdef, self.params, state, self._place(tokens_B), experts=self.experts)

    def _place(self, array):
        return jnp.asarray(array) if self.batch_sharding is None else jax.device_put(array, self.batch_sharding)

    # Generation ------------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                 sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True) -> GenerateResult:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens_BT, mask_BT = self.pad_prompts(prompts)
        T = tokens_BT.shape[1]
        if T + max_new_tokens > self.cfg.max_seq_len:
            raise ValueError(f"prompt length {T} (after padding) plus max_new_tokens {max_new_tokens} exceeds the "
                             f"model's maximum sequence length {self.cfg.max_seq_len}")
        cache_len = min(self.cfg.max_seq_len, math.ceil((T + max_new_tokens) / 64) * 64)
        key = jax.random.key(sampling.seed)
        B = len(prompts)

        start = time.perf_counter()
        logits_BV, state, stats = self.prefill(tokens_BT, mask_BT, cache_len=cache_len)
        next_B = _sample(logits_BV, jax.random.fold_in(key, 0), sampling)
        host_next = np.asarray(next_B)
        prefill_seconds = time.perf_counter() - start

        eos = self.cfg.eos_token_id if stop_at_eos else None
        tokens_BN = np.zeros((B, max_new_tokens), np.int32)  # token t of every sequence (EOS handled below)
        tokens_BN[:, 0] = host_next
        start = time.perf_counter()
        produced, decode_stats = self._decode_tokens(state, next_B, tokens_BN, key, sampling, eos)
        decode_seconds = time.perf_counter() - start
        out = [_until_eos(row[:produced], eos) for row in tokens_BN]
        tokens_per_expert = np.asarray(stats.tokens_per_expert, np.int64) + decode_stats.tokens_per_expert
        dropped = int(np.sum(stats.dropped)) + int(np.sum(decode_stats.dropped))
        if dropped:
            warnings.warn(f"{dropped} expert assignments were dropped by the capacity limit", stacklevel=2)
        return GenerateResult(tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                              prompt_tokens=int(mask_BT.sum()), generated_tokens=sum(len(o) for o in out),
                              tokens_per_expert=tokens_per_expert, dropped=dropped)

    def _decode_tokens(self, state, next_B, tokens_BN, key, sampling: SamplingParams, eos: int | None):
        """Fills tokens_BN[:, 1:] (column 0 holds the prefill's tokens, next_B on the device) until every sequence
        has sampled EOS or the columns run out; returns the columns filled and the steps' MoE statistics (host
        arrays). On the device: up to decode_chunk steps per call (sampling, EOS bookkeeping and the cache update
        included), so the host sees the tokens once per chunk."""
        B, max_new_tokens = tokens_BN.shape
        finished_B = tokens_BN[:, 0] == eos if eos is not None else np.zeros(B, bool)
        finished_dev = self._place(finished_B)
        per_expert = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        dropped = np.zeros(len(self.cfg.moe_layers), np.int64)
        produced = 1
        while produced < max_new_tokens and not finished_B.all():
            steps = min(self.decode_chunk, max_new_tokens - produced)
            chunk_BC, count, state, next_B, finished_dev, chunk_stats = self._decode_loop(
                self.graphdef, self.params, state, next_B, finished_dev, key, jnp.int32(produced),
                jnp.int32(steps), experts=self.experts, sampling=sampling, eos=eos, chunk=self.decode_chunk,
                stats_shape=per_expert.shape)
            count = int(count)
            tokens_BN[:, produced:produced + count] = np.asarray(chunk_BC)[:, :count]
            finished_B = np.asarray(finished_dev)
            per_expert += np.asarray(chunk_stats.tokens_per_expert)
            dropped += np.asarray(chunk_stats.dropped)
            produced += count
        return produced, MoEStats(tokens_per_expert=per_expert, dropped=dropped)

    def _decode_tokens_on_host(self, state, next_B, tokens_BN, key, sampling: SamplingParams, eos: int | None):
        """_decode_tokens' contract with one decode_step per token driven from the host: for engines whose steps are
        not one device program (epsjax.offload runs the model layer by layer)."""
        B, max_new_tokens = tokens_BN.shape
        finished_B = tokens_BN[:, 0] == eos if eos is not None else np.zeros(B, bool)
        per_expert = np.zeros((len(self.cfg.moe_layers), self.cfg.num_experts), np.int64)
        dropped = np.zeros(len(self.cfg.moe_layers), np.int64)
        produced = 1
        while produced < max_new_tokens and not finished_B.all():
            logits_BV, state, stats = self.decode_step(state, tokens_BN[:, produced - 1])
            per_expert += np.asarray(stats.tokens_per_expert)
            dropped += np.asarray(stats.dropped)
            tokens_BN[:, produced] = np.asarray(_sample(logits_BV, jax.random.fold_in(key, produced), sampling))
            if eos is not None:
                finished_B |= tokens_BN[:, produced] == eos
            produced += 1
        return produced, MoEStats(tokens_per_expert=per_expert, dropped=dropped)


_PREFILL_STATIC = ("graphdef", "experts", "cache_len", "all_logits")


def compiler_options(experts: ExpertCompute) -> dict | None:
    """The XLA options an expert compute asks of the programs that run it (e.g. the GPU latency-hiding
    scheduler for expert parallelism), or None."""
    return getattr(experts, "compiler_options", None) or None


def lower_prefill(graphdef, params, tokens_BT, mask_BT, *, experts: ExpertCompute, cache_len: int,
                  all_logits: bool = False):
    """The Engine's prefill program lowered for (possibly abstract) inputs: ShapeDtypeStructs with shardings
    over compile-only devices build it for a GPU without one (epsjax.aot)."""
    return jax.jit(_prefill, static_argnames=_PREFILL_STATIC, compiler_options=compiler_options(experts)).lower(
        graphdef, params, tokens_BT, mask_BT, experts=experts, cache_len=cache_len, all_logits=all_logits)


def _prefill(graphdef, params, tokens_BT, mask_BT, *, experts, cache_len: int, all_logits: bool):
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
    out = model(tokens_BT, positions_BT, mask_BT, prefill_mask(mask_BT), experts=experts,
                cache=model.init_cache(B, cache_len), write_index=0, last_logits_only=not all_logits, causal=True)
    kv_valid_BS = jnp.zeros((B, cache_len), bool).at[:, :T].set(mask_BT)
    state = DecodeState(cache=out.cache, kv_valid_BS=kv_valid_BS, next_position_B=positions_BT[:, -1] + 1,
                        write_index=jnp.asarray(T, jnp.int32))
    logits = out.logits if all_logits else out.logits[:, -1]
    return logits, state, out.moe_stats


def _decode_loop(graphdef, params, state: DecodeState, tokens_B, finished_B, key, first_step, num_steps, *,
                 experts, sampling: SamplingParams, eos: int | None, chunk: int, stats_shape: tuple[int, int]):
    """Up to `num_steps` (traced, <= chunk) decode steps in one device call, stopping early once every sequence
    has finished. Step i feeds the previous step's tokens and samples with fold_in(key, first_step + i), exactly as
    a host loop of decode_step and sample would. Returns the sampled tokens [B, chunk] (columns past the count are
    zeros), the number of steps run, the state, the last tokens [B], finished [B] (EOS seen) and MoE statistics
    summed over the steps (stats_shape: MoE layers, experts)."""
    B = tokens_B.shape[0]
    n_moe, E = stats_shape

    def cond(carry):
        i, _, _, finished, *_ = carry
        return (i < num_steps) & ~jnp.all(finished)

    def body(carry):
        i, state, tokens, finished, out_BC, per_expert, dropped = carry
        logits_BV, state, stats = _decode_step(graphdef, params, state, tokens, experts=experts)
        tokens = sample(logits_BV, jax.random.fold_in(key, first_step + i), sampling)
        out_BC = jax.lax.dynamic_update_slice_in_dim(out_BC, tokens[:, None], i, axis=1)
        if eos is not None:
            finished = finished | (tokens == eos)
        return (i + 1, state, tokens, finished, out_BC, per_expert + stats.tokens_per_expert,
                dropped + stats.dropped)

    init = (jnp.int32(0), state, tokens_B, finished_B, jnp.zeros((B, chunk), jnp.int32),
            jnp.zeros((n_moe, E), jnp.int32), jnp.zeros((n_moe,), jnp.int32))
    count, state, tokens_B, finished_B, out_BC, per_expert, dropped = jax.lax.while_loop(cond, body, init)
    return out_BC, count, state, tokens_B, finished_B, MoEStats(tokens_per_expert=per_expert, dropped=dropped)


_sample = jax.jit(sample, static_argnames=("sampling",))


def _until_eos(row, eos: int | None) -> list[int]:
    """A sequence's tokens up to and including its first EOS."""
    row = [int(t) for t in row]
    if eos is not None and eos in row:
        return row[:row.index(eos) + 1]
    return row


def _decode_step(graphdef, params, state: DecodeState, tokens_B, *, experts):
    model = nnx.merge(graphdef, params)
    B = tokens_B.shape[0]
    kv_valid_BS = state.kv_valid_BS.at[:, state.write_index].set(True)
    valid_B1 = jnp.ones((B, 1), bool)
    out = model(tokens_B[:, None], state.next_position_B[:, None], valid_B1,
                decode_mask(kv_valid_BS, state.write_index, 1), experts=experts, cache=state.cache,
                write_index=state.write_index, attend_to_cache=True)
    new_state = DecodeState(cache=out.cache, kv_valid_BS=kv_valid_BS, next_position_B=state.next_position_B + 1,
                            write_index=state.write_index + 1)
    return out.logits[:, -1], new_state, out.moe_stats
