"""Inference entry points: jitted prefill and decode_step over a KV cache, sampling, and generate.

Prompts of different lengths are left-padded into one batch: padding slots are masked out of attention and of
the MoE (no expert computes a padding token), and rotary positions count real tokens only, as transformers does.
Bad requests raise RequestError before anything runs: an empty batch or prompt, token ids that are not integers
or lie outside the vocabulary, prompts (real, unpadded lengths) that do not fit the model or the cache, sampling
parameters that are not finite or out of range, a seed outside the PRNG's 32-bit range, a decode step whose batch
differs from its state's.
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

from epsjax.compilation import CompileCounter, ShapeBuckets
from epsjax.models import ExpertCompute, LocalExperts, MoEStats, MoETransformer
from epsjax.models.transformer import decode_mask, prefill_mask
from epsjax.pallas_kernels.errors import EpsjaxError


DECODE_CHUNK = 32  # decode steps per device call in generate: the host sees the tokens once per chunk


SEED_LIMIT = 2**32  # jax.random.key takes 32-bit seeds without x64: 2**32 would silently equal seed 0


class RequestError(EpsjaxError):
    """A request the engine cannot serve as asked: the message names the argument, the value and what is allowed."""


def _number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


_NONE = object()


def _flatten(values):
    """The scalars of a (nested) sequence or array, in order."""
    if isinstance(values, np.ndarray):
        yield from values.reshape(-1).tolist() if values.dtype != object else values.reshape(-1)
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _flatten(v)
    else:
        yield values


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; otherwise sample from softmax(logits / temperature) restricted to the top-p mass.
    seed: an integer in [0, 2**32)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not _number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _integer(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise RequestError(f"seed must be an integer in [0, 2**32) (jax's PRNG takes 32-bit seeds), "
                               f"got {self.seed!r}")


@dataclasses.dataclass(frozen=True)
class DecodeState:
    cache: list[dict]          # per layer, [B, S, ...] each
    kv_valid_BS: jax.Array     # [B, S] bool: slots holding real tokens
    next_position_B: jax.Array  # [B] int32 rotary position of the next token
    write_index: jax.Array     # [] int32 next cache slot (shared by the batch: prompts are left-padded)
    active_B: jax.Array        # [B] bool: rows with a real prompt (False: batch padding, which computes nothing)


jax.tree_util.register_dataclass(
    DecodeState, data_fields=["cache", "kv_valid_BS", "next_position_B", "write_index", "active_B"], meta_fields=[])


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
    buckets: the shape ladders generate rounds batches, prompt lengths and cache lengths up to, which bound the
        programs it compiles (`ShapeBuckets.program_bound`); None: exact batches, prompts padded to a multiple of
        8, caches to a multiple of 64 (every new combination compiles).
    """

    def __init__(self, model: MoETransformer, *, experts: ExpertCompute = LocalExperts(),
                 batch_sharding: jax.sharding.Sharding | None = None, decode_chunk: int = DECODE_CHUNK,
                 buckets: ShapeBuckets | None = ShapeBuckets()):
        if not isinstance(decode_chunk, int) or decode_chunk < 1:
            raise RequestError(f"decode_chunk must be a positive int, got {decode_chunk!r}")
        if buckets is not None and not isinstance(buckets, ShapeBuckets):
            raise RequestError(f"buckets must be a ShapeBuckets or None, got {type(buckets).__name__}")
        self.buckets = buckets
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

    def _token_ids(self, values, what: str) -> np.ndarray:
        """values as an int64 array of token ids, or a RequestError naming `what` and the first bad value."""
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu" and values.dtype != np.uint64:
            array = values.astype(np.int64)
        else:
            flat = list(_flatten(values))
            bad = next((v for v in flat if not _integer(v)), _NONE)
            if bad is not _NONE:
                raise RequestError(f"{what}: token ids must be integers, got {bad!r} ({type(bad).__name__})")
            huge = [v for v in flat if not -2**63 <= v < 2**63]
            if huge:
                raise RequestError(f"{what} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): "
                                   f"{huge[:10]}")
            try:
                array = np.asarray(values, dtype=np.int64)
            except ValueError:
                raise RequestError(f"{what} must be a rectangular array of token ids (rows of one length)") from None
        bad = array[(array < 0) | (array >= self.cfg.vocab_size)]
        if bad.size:
            raise RequestError(f"{what} has token ids outside the vocabulary [0, {self.cfg.vocab_size}): "
                               f"{sorted(set(bad.tolist()))[:10]}")
        return array

    def _prompt_ids(self, prompts) -> list[np.ndarray]:
        """The prompts as int64 arrays, each checked (a RequestError names the prompt and what is wrong)."""
        if isinstance(prompts, (str, bytes)) or not hasattr(prompts, "__len__"):
            raise RequestError(f"prompts must be a list of token-id sequences, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise RequestError("empty batch: give at least one prompt")
        for i, p in enumerate(prompts):
            if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
                raise RequestError(f"prompt {i} must be a sequence of token ids, got {type(p).__name__}")
        empty = [i for i, p in enumerate(prompts) if len(p) == 0]
        if empty:
            raise RequestError(f"prompts {empty} are empty: every prompt needs at least one token")
        ids = [self._token_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        if any(a.ndim != 1 for a in ids):
            raise RequestError("each prompt must be a flat sequence of token ids")
        return ids

    def pad_prompts(self, prompts: Sequence[Sequence[int]], *, multiple: int = 8,
                    max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Left-pads prompts to one length, rounded up to `multiple` to reuse compilations but never past
        max_length (default: the model's max_seq_len): tokens, mask [B, T]."""
        ids = self._prompt_ids(prompts)
        T = max(len(p) for p in ids)
        max_length = self.cfg.max_seq_len if max_length is None else max_length
        T = min(math.ceil(T / multiple) * multiple, max(T, max_length))
        return self._left_pad(ids, len(ids), T)

    def _left_pad(self, ids: Sequence[np.ndarray], B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """tokens, mask [B, T]: each prompt left-padded to T; rows past len(ids) are batch padding (no token)."""
        tokens = np.full((B, T), self.cfg.pad_token_id, np.int32)
        mask = np.zeros((B, T), bool)
        for i, p in enumerate(ids):
            tokens[i, T - len(p):] = p
            mask[i, T - len(p):] = True
        return tokens, mask

    def check_prefill_inputs(self, tokens_BT, mask_BT, cache_len: int | None, pad_rows: int = 0):
        """Host-side checks of a prefill request: tokens [B, T] (int32), mask [B, T] (bool), the cache length.
        The last `pad_rows` rows may be batch padding (no real token)."""
        tokens_BT = self._token_ids(tokens_BT, "tokens")
        if tokens_BT.ndim != 2 or tokens_BT.shape[0] == 0 or tokens_BT.shape[1] == 0:
            raise RequestError(f"tokens must be a non-empty [batch, length] array, got shape {tokens_BT.shape}")
        if mask_BT is None:
            mask_BT = np.ones(tokens_BT.shape, bool)
        else:
            mask_BT = np.asarray(mask_BT)
            if mask_BT.dtype != bool and not (mask_BT.dtype.kind in "iu" and np.isin(mask_BT, (0, 1)).all()):
                raise RequestError(f"the attention mask must be boolean (or 0/1 integers), got {mask_BT.dtype}")
            mask_BT = mask_BT.astype(bool)
        if mask_BT.shape != tokens_BT.shape:
            raise RequestError(f"attention mask shape {mask_BT.shape} differs from tokens shape {tokens_BT.shape}")
        real_B = mask_BT.any(axis=1)
        if not _integer(pad_rows) or not 0 <= pad_rows < tokens_BT.shape[0]:
            raise RequestError(f"pad_rows must be an int in [0, batch); got {pad_rows!r}")
        if not real_B[:tokens_BT.shape[0] - pad_rows].all():
            raise RequestError(f"sequences {np.flatnonzero(~real_B[:tokens_BT.shape[0] - pad_rows]).tolist()} have "
                               "no real token in the mask")
        cache_len = self.cfg.max_seq_len if cache_len is None else cache_len
        if not _integer(cache_len) or cache_len < 1:
            raise RequestError(f"cache_len must be a positive integer, got {cache_len!r}")
        if tokens_BT.shape[1] > cache_len:
            raise RequestError(f"prompt length {tokens_BT.shape[1]} exceeds the cache length {cache_len}")
        return tokens_BT.astype(np.int32), mask_BT, int(cache_len)

    # Jitted steps ----------------------------------------------------------------------------------------------

    def prefill(self, tokens_BT, mask_BT=None, *, cache_len: int | None = None, all_logits: bool = False,
                pad_rows: int = 0):
        """Runs the prompts; returns (logits, state, moe_stats). logits is [B, V] for the last position, or
        [B, T, V] with all_logits; moe_stats counts tokens per expert per MoE layer. The cache holds cache_len
        slots (default: the model's max_seq_len). The last `pad_rows` rows may be batch padding (an all-False
        mask row): they route nothing and their outputs are meaningless."""
        tokens_BT, mask_BT, cache_len = self.check_prefill_inputs(tokens_BT, mask_BT, cache_len, pad_rows)
        tokens_BT, mask_BT = self._place(tokens_BT), self._place(mask_BT)
        return self._prefill(self.graphdef, self.params, tokens_BT, mask_BT, experts=self.experts,
                             cache_len=cache_len, all_logits=all_logits)

    def decode_step(self, state: DecodeState, tokens_B):
        """Feeds one token per sequence; returns (logits [B, V], state, moe_stats). `state` is consumed."""
        if not isinstance(state, DecodeState):
            raise RequestError(f"state must be the DecodeState prefill or decode_step returned, got "
                               f"{type(state).__name__}")
        tokens_B = self.check_decode_inputs(tokens_B, state.kv_valid_BS.shape, int(state.write_index))
        return self._step(self.graphdef, self.params, state, self._place(tokens_B), experts=self.experts)

    def check_decode_inputs(self, tokens_B, cache_shape: tuple[int, int], write_index: int) -> np.ndarray:
        """Host-side checks of a decode step: one valid token id per sequence of the state's batch, and a free
        cache slot (cache_shape: the state's [batch, cache length]). Returns the tokens as int32."""
        tokens_B = self._token_ids(tokens_B, "tokens")
        batch, cache_len = cache_shape
        if tokens_B.shape != (batch,):
            raise RequestError(f"decode_step takes one token per sequence of the state's batch ({batch}), got "
                               f"shape {tokens_B.shape}")
        if write_index >= cache_len:
            raise RequestError(f"the KV cache is full ({cache_len} slots); prefill with a larger cache_len")
        return tokens_B.astype(np.int32)

    def _place(self, array):
        return jnp.asarray(array) if self.batch_sharding is None else jax.device_put(array, self.batch_sharding)

    # Generation ------------------------------------------------------------------------------------------------

    def check_request(self, prompts, max_new_tokens, sampling) -> list[np.ndarray]:
        """generate's argument checks (a RequestError names what is wrong); the prompts as arrays."""
        if not _integer(max_new_tokens) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        ids = self._prompt_ids(prompts)
        longest = max(len(p) for p in ids)
        if longest + max_new_tokens > self.cfg.max_seq_len:
            raise RequestError(f"prompt length {longest} plus max_new_tokens {max_new_tokens} exceeds the model's "
                               f"maximum sequence length {self.cfg.max_seq_len}")
        return ids

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                 sampling: SamplingParams = SamplingParams(), stop_at_eos: bool = True) -> GenerateResult:
        ids = self.check_request(prompts, max_new_tokens, sampling)
        B = len(ids)
        tokens_BT, mask_BT, cache_len = self.request_shapes(ids, max_new_tokens)
        key = jax.random.key(sampling.seed)
        start = time.perf_counter()
        logits_BV, state, stats = self.prefill(tokens_BT, mask_BT, cache_len=cache_len,
                                               pad_rows=tokens_BT.shape[0] - B)
        next_B = _sample(logits_BV, jax.random.fold_in(key, 0), sampling)
        host_next = np.asarray(next_B)
        prefill_seconds = time.perf_counter() - start

        eos = self.cfg.eos_token_id if stop_at_eos else None
        tokens_BN = np.zeros((tokens_BT.shape[0], max_new_tokens), np.int32)  # token t of every row
        tokens_BN[:, 0] = host_next
        start = time.perf_counter()
        produced, decode_stats = self._decode_tokens(state, next_B, tokens_BN, key, sampling, eos, real_rows=B)
        decode_seconds = time.perf_counter() - start
        out = [_until_eos(row[:produced], eos) for row in tokens_BN[:B]]
        tokens_per_expert = np.asarray(stats.tokens_per_expert, np.int64) + decode_stats.tokens_per_expert
        dropped = int(np.asarray(stats.dropped).sum()) + int(np.asarray(decode_stats.dropped).sum())  # on the host
        if dropped:
            warnings.warn(f"{dropped} expert assignments were dropped by the capacity limit", stacklevel=2)
        return GenerateResult(tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                              prompt_tokens=int(mask_BT.sum()), generated_tokens=sum(len(o) for o in out),
                              tokens_per_expert=tokens_per_expert, dropped=dropped)

    def request_shapes(self, ids: Sequence[np.ndarray], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Tokens and mask [B', T] (prompts left-padded, B' - len(ids) rows of batch padding at the end) and the
        cache length generate runs the request with: bucketed (`self.buckets`), or without buckets the exact batch,
        prompts padded to a multiple of 8 and caches to a multiple of 64, as before."""
        longest = max(len(p) for p in ids)
        if self.buckets is None:  # padding stops where the generated tokens would no longer fit
            tokens_BT, mask_BT = self.pad_prompts(ids, max_length=self.cfg.max_seq_len - max_new_tokens + 1)
            T = tokens_BT.shape[1]
            return tokens_BT, mask_BT, min(self.cfg.max_seq_len, math.ceil((T + max_new_tokens) / 64) * 64)
        B = self.buckets.batch_size(len(ids), _batch_multiple(self.batch_sharding))
        T = self.buckets.length(longest)
        tokens_BT, mask_BT = self._left_pad(ids, B, T)
        # positions count real tokens, so a cache longer than max_seq_len only holds more (masked) padding
        return tokens_BT, mask_BT, self.buckets.length(T + max_new_tokens)

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_lengths: Sequence[int] = (16,),
               max_new_tokens: Sequence[int] = (16,), *, sampling: SamplingParams = SamplingParams(),
               stop_at_eos: bool = True, progress: bool = True) -> list[dict]:
        """Compiles, ahead of traffic, the programs generate needs for every (batch, prompt length, new tokens)
        combination given (each rounded to its bucket; combinations in the same bucket compile once): the
        prefill, the sampler and one decode chunk at the bucket's shapes, with the sampling and EOS setting the
        traffic will use. Returns one record per bucket: its shapes, seconds and programs compiled."""
        filler = 0 if self.cfg.pad_token_id is None else int(self.cfg.pad_token_id)
        combos = {}
        for b in batch_sizes:
            for t in prompt_lengths:
                for new in max_new_tokens:
                    if not (_integer(b) and _integer(t) and _integer(new)) or min(b, t, new) < 1:
                        raise RequestError(f"warmup: batch sizes, prompt lengths and max_new_tokens must be "
                                           f"positive ints; got {b!r}, {t!r}, {new!r}")
                    if t + new > self.cfg.max_seq_len:
                        raise RequestError(f"warmup: prompt length {t} plus {new} new tokens exceeds the model's "
                                           f"maximum sequence length {self.cfg.max_seq_len}")
                    tokens_BT, mask_BT, cache_len = self.request_shapes([np.full(t, filler)] * b, new)
                    combos.setdefault((tokens_BT.shape, cache_len, new > 1), (tokens_BT, mask_BT, b))
        eos = self.cfg.eos_token_id if stop_at_eos else None
        key = jax.random.key(sampling.seed)
        records = []
        bar = _progress(len(combos), "warmup", progress)
        for ((B, T), cache_len, decodes), (tokens_BT, mask_BT, b) in combos.items():
            start = time.perf_counter()
            with CompileCounter() as compiled:
                logits_BV, state, _ = self.prefill(tokens_BT, mask_BT, cache_len=cache_len, pad_rows=B - b)
                next_B = _sample(logits_BV, jax.random.fold_in(key, 0), sampling)
                tokens_BN = np.zeros((B, 2 if decodes else 1), np.int32)
                tokens_BN[:, 0] = np.asarray(next_B)
                if decodes:  # one decode step: the decode loop's program (its step count is traced)
                    self._decode_tokens(state, next_B, tokens_BN, key, sampling, eos, real_rows=b)
            records.append({"batch": B, "prompt_length": T, "cache_length": cache_len, "decode": decodes,
                            "seconds": time.perf_counter() - start, "programs": compiled.programs,
                            "compile_seconds": compiled.seconds})
            bar.update(1)
            bar.set_postfix_str(f"B={B} T={T} cache={cache_len}: {compiled.programs} programs")
        bar.close()
        return records

    def _decode_tokens(self, state, next_B, tokens_BN, key, sampling: SamplingParams, eos: int | None,
                       real_rows: int | None = None):
        """Fills tokens_BN[:, 1:] (column 0 holds the prefill's tokens, next_B on the device) until every sequence
        has sampled EOS or the columns run out; returns the columns filled and the steps' MoE statistics (host
        arrays). On the device: up to decode_chunk steps per call (sampling, EOS bookkeeping and the cache update
        included), so the host sees the tokens once per chunk."""
        B, max_new_tokens = tokens_BN.shape
        finished_B = tokens_BN[:, 0] == eos if eos is not None else np.zeros(B, bool)
        finished_B[B if real_rows is None else real_rows:] = True  # batch padding never holds the loop open
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

    def _decode_tokens_on_host(self, state, next_B, tokens_BN, key, sampling: SamplingParams, eos: int | None,
                               real_rows: int | None = None):
        """_decode_tokens' contract with one decode_step per token driven from the host: for engines whose steps are
        not one device program (epsjax.offload runs the model layer by layer)."""
        B, max_new_tokens = tokens_BN.shape
        finished_B = tokens_BN[:, 0] == eos if eos is not None else np.zeros(B, bool)
        finished_B[B if real_rows is None else real_rows:] = True
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


def prefill_inputs(mask_BT, cache_len: int):
    """Of a left-padded prompt batch: rotary positions counting real tokens only, the cache's valid slots
    [B, cache_len] and the active rows (a real prompt; batch padding has none). Shared with epsjax.offload."""
    positions_BT = jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0).astype(jnp.int32)
    kv_valid_BS = jnp.zeros((mask_BT.shape[0], cache_len), bool).at[:, :mask_BT.shape[1]].set(mask_BT)
    return positions_BT, kv_valid_BS, mask_BT.any(axis=1)


def decode_inputs(state: DecodeState):
    """Of one decode step: the cache's valid slots with the new token's slot, and its attention mask [B, 1, S].
    Shared with epsjax.offload."""
    kv_valid_BS = state.kv_valid_BS.at[:, state.write_index].set(True)
    return kv_valid_BS, decode_mask(kv_valid_BS, state.write_index, 1)


def _prefill(graphdef, params, tokens_BT, mask_BT, *, experts, cache_len: int, all_logits: bool):
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions_BT, kv_valid_BS, active_B = prefill_inputs(mask_BT, cache_len)
    out = model(tokens_BT, positions_BT, mask_BT, prefill_mask(mask_BT), experts=experts,
                cache=model.init_cache(B, cache_len), write_index=0, last_logits_only=not all_logits, causal=True)
    state = DecodeState(cache=out.cache, kv_valid_BS=kv_valid_BS, next_position_B=positions_BT[:, -1] + 1,
                        write_index=jnp.asarray(T, jnp.int32), active_B=active_B)
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


def _batch_multiple(sharding) -> int:
    """How many shards a batch_sharding splits the batch dimension into (batches must be multiples of it)."""
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None:
        return 1
    axes = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    return math.prod(sharding.mesh.shape[a] for a in axes)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="bucket", disable=not enabled)


def _until_eos(row, eos: int | None) -> list[int]:
    """A sequence's tokens up to and including its first EOS."""
    row = [int(t) for t in row]
    if eos is not None and eos in row:
        return row[:row.index(eos) + 1]
    return row


def _decode_step(graphdef, params, state: DecodeState, tokens_B, *, experts):
    model = nnx.merge(graphdef, params)
    kv_valid_BS, mask_B1S = decode_inputs(state)
    valid_B1 = state.active_B[:, None]  # batch padding routes nothing
    out = model(tokens_B[:, None], state.next_position_B[:, None], valid_B1, mask_B1S, experts=experts,
                cache=state.cache, write_index=state.write_index, attend_to_cache=True)
    new_state = DecodeState(cache=out.cache, kv_valid_BS=kv_valid_BS, next_position_B=state.next_position_B + 1,
                            write_index=state.write_index + 1, active_B=state.active_B)
    return out.logits[:, -1], new_state, out.moe_stats
