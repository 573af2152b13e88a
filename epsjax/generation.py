"""The generation layer: prompts in, tokens out, over any executor.

One `Generator` owns everything between a request and the model: request checks, shape buckets, per-request
sampling (as data), EOS / stop tokens / max_new_tokens, statistics and warm-up. It drives an executor, which only
runs the model:

    run_prefill(tokens_BT, mask_BT, *, cache_len, all_logits) -> logits, state, moe_stats   prompts (left-padded)
    run_step(state, tokens_B) -> logits_BV, state, moe_stats                              one token per slot
    run_loop(state, rows, num_steps, chunk) -> ...     optional: several steps + sampling in one device call
    empty_state(num_slots, cache_len) / insert(state, new, src_rows, slots) / release(state, slots)
    batch_multiple                                     batches are multiples of it (data-parallel shards)

Executors: the jitted single program (epsjax.engine: one device and every mesh strategy), DEP (epsjax.dep) and
offload (epsjax.offload). A decode state is a set of slots, each with its own cache length, write position and
rotary position: a prefilled request is inserted into a free slot while the others keep decoding
(`DecodeSlots`), and a finished slot is released and reused. Sampling settings live in `SlotRows`, arrays with
one row per slot, so a batch mixing temperatures, top-p, top-k and seeds runs one compiled program. Each request
samples from its own stream, fold_in(key(seed), index of the token), so its tokens do not depend on what else is
in the batch or when it was inserted.
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

from epsjax.compilation import CompileCounter, ShapeBuckets
from epsjax.errors import EpsjaxError
from epsjax.models import MoEStats

DECODE_CHUNK = 32  # decode steps per device call in generate: the host sees the tokens once per chunk
SEED_LIMIT = 2**32  # jax.random.key takes 32-bit seeds without x64: 2**32 would silently equal seed 0
MAX_STOP_IDS = 16   # stop token ids per request (EOS included): a fixed width, so no setting compiles anew


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
    """How one request samples. temperature 0 is greedy; otherwise softmax(logits / temperature) restricted to the
    top_k most likely tokens (0: all), then to the smallest set holding top_p of the mass.
    seed: an integer in [0, 2**32); max_new_tokens: this request's budget (None: generate's argument);
    stop_token_ids: tokens that end the request besides EOS (the stop token is kept in the output)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_k: int = 0
    max_new_tokens: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if not _number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _number(self.top_p) or not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _integer(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            raise RequestError(f"seed must be an integer in [0, 2**32) (jax's PRNG takes 32-bit seeds), "
                               f"got {self.seed!r}")
        if not _integer(self.top_k) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0: no top-k limit), got {self.top_k!r}")
        if self.max_new_tokens is not None and (not _integer(self.max_new_tokens) or self.max_new_tokens < 1):
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not isinstance(self.stop_token_ids, (tuple, list)):
            raise RequestError(f"stop_token_ids must be a tuple of token ids, got {self.stop_token_ids!r}")
        bad = [t for t in self.stop_token_ids if not _integer(t) or t < 0]
        if bad:
            raise RequestError(f"stop_token_ids must be token ids (integers >= 0), got {bad[:5]}")
        if len(self.stop_token_ids) > MAX_STOP_IDS - 1:
            raise RequestError(f"at most {MAX_STOP_IDS - 1} stop_token_ids per request, got "
                               f"{len(self.stop_token_ids)}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


@dataclasses.dataclass(frozen=True)
class SlotRows:
    """Per slot: its sampling settings and where its request stands, as arrays ([B] each, [B, MAX_STOP_IDS] for the
    stop ids), so that settings are data, not compiled constants."""

    temperature_B: jax.Array   # float32; 0 = greedy
    top_p_B: jax.Array         # float32 in (0, 1]
    top_k_B: jax.Array         # int32; 0 = no limit
    seed_B: jax.Array          # uint32
    produced_B: jax.Array      # int32 tokens generated so far (the next token's index in its request's stream)
    max_new_B: jax.Array       # int32 the request's budget
    stop_BK: jax.Array         # int32 token ids that finish the request (-1: none)
    finished_B: jax.Array      # bool: no more tokens for this slot (done, or no request in it)
    last_B: jax.Array          # int32 the last sampled token: the next decode step's input

    @staticmethod
    def build(params: Sequence[SamplingParams], max_new: Sequence[int], eos: int | None, rows: int) -> "SlotRows":
        """Host arrays for `rows` slots, the first len(params) holding requests; the rest are finished."""
        n = len(params)
        stop = np.full((rows, MAX_STOP_IDS), -1, np.int32)
        for i, p in enumerate(params):
            ids = ((eos,) if eos is not None else ()) + p.stop_token_ids
            stop[i, :len(ids)] = ids
        pad = [0] * (rows - n)
        return SlotRows(
            temperature_B=np.array([p.temperature for p in params] + pad, np.float32),
            top_p_B=np.array([p.top_p for p in params] + [1] * (rows - n), np.float32),
            top_k_B=np.array([p.top_k for p in params] + pad, np.int32),
            seed_B=np.array([p.seed for p in params] + pad, np.uint32),
            produced_B=np.zeros(rows, np.int32),
            max_new_B=np.array(list(max_new) + [1] * (rows - n), np.int32),
            stop_BK=stop,
            finished_B=np.arange(rows) >= n,
            last_B=np.zeros(rows, np.int32))


jax.tree_util.register_dataclass(SlotRows, data_fields=[f.name for f in dataclasses.fields(SlotRows)],
                                 meta_fields=[])


def row_keys(seed_B, index_B):
    """Each row's PRNG key for its token `index_B`: fold_in(key(seed), index), the request's own stream."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seed_B, index_B)


def sample(logits_BV, rows: SlotRows):
    """Next tokens [B] int32 from last-position logits [B, V], each row by its own settings: argmax where the
    temperature is 0; else a draw from its stream (row_keys at its produced count) over softmax(logits / T)
    limited to its top_k tokens, then to the smallest prefix of them holding top_p of their mass."""
    greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)

    def draw():
        V = logits_BV.shape[-1]
        hot_B = rows.temperature_B > 0
        logits = logits_BV.astype(jnp.float32) / jnp.where(hot_B, rows.temperature_B, 1)[:, None]
        sorted_BV = jnp.sort(logits, axis=-1)[:, ::-1]
        k_B = jnp.where(rows.top_k_B > 0, jnp.minimum(rows.top_k_B, V), V)
        in_top_k_BV = jnp.arange(V) < k_B[:, None]
        kth_B1 = jnp.take_along_axis(sorted_BV, k_B[:, None] - 1, axis=-1)
        probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, sorted_BV, -jnp.inf), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        nucleus_B1 = jnp.min(jnp.where(in_top_k_BV & (mass_before_BV < rows.top_p_B[:, None]), sorted_BV, jnp.inf),
                             axis=-1, keepdims=True)
        threshold_B1 = jnp.maximum(jnp.where(rows.top_k_B[:, None] > 0, kth_B1, -jnp.inf),
                                   jnp.where(rows.top_p_B[:, None] < 1, nucleus_B1, -jnp.inf))
        logits = jnp.where(logits >= threshold_B1, logits, -jnp.inf)
        keys_B = row_keys(rows.seed_B, rows.produced_B)
        drawn_B = jax.vmap(lambda key, row_V: jax.random.categorical(key, row_V))(keys_B, logits).astype(jnp.int32)
        return jnp.where(hot_B, drawn_B, greedy_B)

    return jax.lax.cond(jnp.any(rows.temperature_B > 0), draw, lambda: greedy_B)


def advance(logits_BV, rows: SlotRows):
    """One token per slot from its logits: (tokens [B], emitted [B] (the slot was still generating), new rows).
    A slot finishes on a stop token (kept) or when it has produced max_new tokens."""
    tokens_B = sample(logits_BV, rows)
    emitted_B = ~rows.finished_B
    produced_B = rows.produced_B + emitted_B
    stop_B = jnp.any(tokens_B[:, None] == rows.stop_BK, axis=-1)
    finished_B = rows.finished_B | (emitted_B & (stop_B | (produced_B >= rows.max_new_B)))
    return tokens_B, emitted_B, dataclasses.replace(rows, produced_B=produced_B, finished_B=finished_B,
                                                    last_B=tokens_B)


_advance = jax.jit(advance)


@jax.jit
def _put_rows(rows: SlotRows, new: SlotRows, src, dst) -> SlotRows:
    return jax.tree.map(lambda a, b: a.at[dst].set(b[src]), rows, new)


@jax.jit
def _finish_rows(rows: SlotRows, slots) -> SlotRows:
    return dataclasses.replace(rows, finished_B=rows.finished_B.at[slots].set(True))


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]           # new tokens per prompt (stopping at and including EOS or a stop token)
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


class _Stats:
    """MoE statistics summed on the host."""

    def __init__(self, cfg):
        self.per_expert = np.zeros((len(cfg.moe_layers), cfg.num_experts), np.int64)
        self.dropped = np.zeros(len(cfg.moe_layers), np.int64)

    def add(self, stats: MoEStats) -> None:
        self.per_expert += np.asarray(stats.tokens_per_expert, np.int64)
        self.dropped += np.asarray(stats.dropped, np.int64)


class Generator:
    """Prompts to tokens over an executor (module docstring).

    buckets: the shape ladders generate rounds batches, prompt lengths and cache lengths up to, which bound the
        programs it compiles (`ShapeBuckets.program_bound`); None: exact batches, prompts padded to a multiple of
        8, caches to a multiple of 64 (every new combination compiles).
    decode_chunk: decode steps per device call where the executor has an on-device loop.
    """

    def __init__(self, executor, *, buckets: ShapeBuckets | None = ShapeBuckets(), decode_chunk: int = DECODE_CHUNK):
        if not isinstance(decode_chunk, int) or isinstance(decode_chunk, bool) or decode_chunk < 1:
            raise RequestError(f"decode_chunk must be a positive int, got {decode_chunk!r}")
        if buckets is not None and not isinstance(buckets, ShapeBuckets):
            raise RequestError(f"buckets must be a ShapeBuckets or None, got {type(buckets).__name__}")
        self.executor = executor
        self.cfg = executor.cfg
        self.buckets = buckets
        self.decode_chunk = decode_chunk

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

    def check_decode_inputs(self, tokens_B, state) -> np.ndarray:
        """Host-side checks of a decode step: one valid token id per slot of the state, and a free cache slot in
        every live one. Returns the tokens as int32."""
        tokens_B = self._token_ids(tokens_B, "tokens")
        batch, cache_len = self.executor.cache_shape(state)
        if tokens_B.shape != (batch,):
            raise RequestError(f"decode_step takes one token per sequence of the state's batch ({batch}), got "
                               f"shape {tokens_B.shape}")
        if self.executor.longest(state) >= cache_len:
            raise RequestError(f"the KV cache is full ({cache_len} slots); prefill with a larger cache_len")
        return tokens_B.astype(np.int32)

    def check_request(self, prompts, max_new_tokens, sampling) -> tuple[list[np.ndarray], list[SamplingParams],
                                                                       list[int]]:
        """generate's argument checks (a RequestError names what is wrong): the prompts as arrays, one
        SamplingParams per prompt and each prompt's max_new_tokens."""
        if not _integer(max_new_tokens) or max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        ids = self._prompt_ids(prompts)
        if isinstance(sampling, SamplingParams):
            params = [sampling] * len(ids)
        elif isinstance(sampling, (list, tuple)) and all(isinstance(s, SamplingParams) for s in sampling):
            if len(sampling) != len(ids):
                raise RequestError(f"sampling: {len(sampling)} SamplingParams for {len(ids)} prompts; give one per "
                                   "prompt or one for all")
            params = list(sampling)
        else:
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__} (or a list of "
                               "SamplingParams, one per prompt)")
        max_new = [max_new_tokens if p.max_new_tokens is None else p.max_new_tokens for p in params]
        for i, (p, new) in enumerate(zip(ids, max_new)):
            if len(p) + new > self.cfg.max_seq_len:
                raise RequestError(f"prompt length {len(p)} plus max_new_tokens {new} exceeds the model's maximum "
                                   f"sequence length {self.cfg.max_seq_len} (prompt {i})")
        return ids, params, max_new

    # The executor's steps, checked ------------------------------------------------------------------------------

    def prefill(self, tokens_BT, mask_BT=None, *, cache_len: int | None = None, all_logits: bool = False,
                pad_rows: int = 0):
        """Runs the prompts; returns (logits, state, moe_stats). logits is [B, V] for the last position, or
        [B, T, V] with all_logits; moe_stats counts tokens per expert per MoE layer. The cache holds cache_len
        slots (default: the model's max_seq_len). The last `pad_rows` rows may be batch padding (an all-False
        mask row): they route nothing and their outputs are meaningless."""
        tokens_BT, mask_BT, cache_len = self.check_prefill_inputs(tokens_BT, mask_BT, cache_len, pad_rows)
        return self.executor.run_prefill(tokens_BT, mask_BT, cache_len=cache_len, all_logits=all_logits)

    def decode_step(self, state, tokens_B):
        """Feeds one token per sequence; returns (logits [B, V], state, moe_stats). `state` is consumed."""
        self.executor.check_state(state)
        tokens_B = self.check_decode_inputs(tokens_B, state)
        return self.executor.run_step(state, tokens_B)

    # Generation ------------------------------------------------------------------------------------------------

    def request_shapes(self, ids: Sequence[np.ndarray], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Tokens and mask [B', T] (prompts left-padded, B' - len(ids) rows of batch padding at the end) and the
        cache length generate runs the request with: bucketed (`self.buckets`), or without buckets the exact batch,
        prompts padded to a multiple of 8 and caches to a multiple of 64."""
        longest = max(len(p) for p in ids)
        if self.buckets is None:  # padding stops where the generated tokens would no longer fit
            tokens_BT, mask_BT = self.pad_prompts(ids, max_length=self.cfg.max_seq_len - max_new_tokens + 1)
            T = tokens_BT.shape[1]
            return tokens_BT, mask_BT, min(self.cfg.max_seq_len, math.ceil((T + max_new_tokens) / 64) * 64)
        B = self.buckets.batch_size(len(ids), self.executor.batch_multiple)
        T = self.buckets.length(longest)
        tokens_BT, mask_BT = self._left_pad(ids, B, T)
        # positions count real tokens, so a cache longer than max_seq_len only holds more (masked) padding
        return tokens_BT, mask_BT, self.buckets.length(T + max_new_tokens)

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 16,
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
                 stop_at_eos: bool = True) -> GenerateResult:
        """New tokens for each prompt: one batch, prefilled together and decoded in its slots until every
        request has finished. sampling: one SamplingParams for all prompts or one per prompt (each prompt gets
        the tokens it would get alone with its settings)."""
        ids, params, max_new = self.check_request(prompts, max_new_tokens, sampling)
        B = len(ids)
        tokens_BT, mask_BT, cache_len = self.request_shapes(ids, max(max_new))
        eos = self.cfg.eos_token_id if stop_at_eos else None
        rows = SlotRows.build(params, max_new, eos, tokens_BT.shape[0])
        stats = _Stats(self.cfg)
        start = time.perf_counter()
        logits_BV, state, prefill_stats = self.prefill(tokens_BT, mask_BT, cache_len=cache_len,
                                                       pad_rows=tokens_BT.shape[0] - B)
        tokens_B, emitted_B, rows = _advance(logits_BV, rows)
        out = [[] for _ in range(tokens_BT.shape[0])]
        _append(out, np.asarray(tokens_B)[:, None], np.asarray(emitted_B)[:, None])
        prefill_seconds = time.perf_counter() - start
        stats.add(prefill_stats)

        start = time.perf_counter()
        state, rows = self._decode(state, rows, max(max_new) - 1, out, stats)
        decode_seconds = time.perf_counter() - start
        out = out[:B]
        dropped = int(stats.dropped.sum())
        if dropped:
            warnings.warn(f"{dropped} expert assignments were dropped by the capacity limit", stacklevel=2)
        return GenerateResult(tokens=out, prefill_seconds=prefill_seconds, decode_seconds=decode_seconds,
                              prompt_tokens=int(mask_BT.sum()), generated_tokens=sum(len(o) for o in out),
                              tokens_per_expert=stats.per_expert, dropped=dropped)

    def _decode(self, state, rows: SlotRows, max_steps: int, out: list[list[int]], stats: _Stats):
        """Decodes every unfinished slot, at most max_steps steps, appending each slot's emitted tokens to out:
        on the device in chunks of decode_chunk steps where the executor has a loop, else a step at a time."""
        finished_B = np.asarray(rows.finished_B)
        steps = 0
        while steps < max_steps and not finished_B.all():
            if hasattr(self.executor, "run_loop"):
                n = min(self.decode_chunk, max_steps - steps)
                tokens_BC, emitted_BC, count, state, rows, step_stats = self.executor.run_loop(
                    state, rows, n, self.decode_chunk)
                count = int(count)
                _append(out, np.asarray(tokens_BC)[:, :count], np.asarray(emitted_BC)[:, :count])
            else:
                logits_BV, state, step_stats = self.executor.run_step(state, np.asarray(rows.last_B))
                tokens_B, emitted_B, rows = _advance(logits_BV, rows)
                _append(out, np.asarray(tokens_B)[:, None], np.asarray(emitted_B)[:, None])
                count = 1
            stats.add(step_stats)
            finished_B = np.asarray(rows.finished_B)
            steps += count
        return state, rows

    def open_slots(self, num_slots: int, cache_len: int) -> "DecodeSlots":
        """An empty decode state of num_slots slots of cache_len cache entries each, for requests that come and
        go (continuous batching): see DecodeSlots."""
        return DecodeSlots(self, num_slots, cache_len)

    def warmup(self, batch_sizes: Sequence[int] = (1,), prompt_lengths: Sequence[int] = (16,),
               max_new_tokens: Sequence[int] = (16,), *, sampling: SamplingParams = SamplingParams(),
               stop_at_eos: bool = True, progress: bool = True) -> list[dict]:
        """Compiles, ahead of traffic, the programs generate needs for every (batch, prompt length, new tokens)
        combination given (each rounded to its bucket; combinations in the same bucket compile once): the
        prefill, the sampler and one decode chunk at the bucket's shapes. Sampling settings are data, so any
        traffic reuses them. Returns one record per bucket: its shapes, seconds and programs compiled."""
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
        records = []
        bar = _progress(len(combos), "warmup", progress)
        for ((B, T), cache_len, decodes), (tokens_BT, mask_BT, b) in combos.items():
            start = time.perf_counter()
            with CompileCounter() as compiled:
                rows = SlotRows.build([sampling] * b, [2 if decodes else 1] * b, eos, B)
                logits_BV, state, _ = self.prefill(tokens_BT, mask_BT, cache_len=cache_len, pad_rows=B - b)
                _, _, rows = _advance(logits_BV, rows)
                if decodes:  # one decode step: the decode loop's program (its step count is traced)
                    rows = dataclasses.replace(rows, finished_B=np.arange(B) >= b)
                    self._decode(state, rows, 1, [[] for _ in range(B)], _Stats(self.cfg))
            records.append({"batch": B, "prompt_length": T, "cache_length": cache_len, "decode": decodes,
                            "seconds": time.perf_counter() - start, "programs": compiled.programs,
                            "compile_seconds": compiled.seconds})
            bar.update(1)
            bar.set_postfix_str(f"B={B} T={T} cache={cache_len}: {compiled.programs} programs")
        bar.close()
        return records


@dataclasses.dataclass
class SlotEvent:
    """What a slot produced in one DecodeSlots call."""

    request: object           # the id the request was inserted with
    slot: int
    tokens: list[int]         # new tokens (in order)
    finished: bool            # the request is done (stop token, EOS or max_new_tokens); its slot is free again


class DecodeSlots:
    """A decode state of S slots that requests join and leave between steps (continuous batching).

        slots = generator.open_slots(num_slots=8, cache_len=512)
        slots.insert([prompt_a, prompt_b], [params_a, params_b], ids=["a", "b"])   # prefill, first tokens
        while slots.busy:
            for event in slots.step(4):          # up to 4 decode steps over every live slot
                ...                              # event.tokens, event.finished (the slot is free again)

    A request is prefilled alone or with others (a batch bucket) into a short cache of its own and then inserted
    into a free slot: its cache entries, length, write and rotary positions and its sampling row. The others keep
    their state. A slot whose request finished is released and reused. Tokens equal a batch generate's of the
    same prompts (greedy, and seeded sampling: each request has its own stream).
    """

    def __init__(self, generator: Generator, num_slots: int, cache_len: int):
        if not _integer(num_slots) or num_slots < 1:
            raise RequestError(f"num_slots must be a positive int, got {num_slots!r}")
        if not _integer(cache_len) or cache_len < 2:
            raise RequestError(f"cache_len must be an int >= 2, got {cache_len!r}")
        multiple = generator.executor.batch_multiple
        if num_slots % multiple:
            raise RequestError(f"num_slots {num_slots} must be a multiple of the batch shards ({multiple})")
        self.generator, self.num_slots, self.cache_len = generator, num_slots, cache_len
        self.state = generator.executor.empty_state(num_slots, cache_len)
        self.rows = jax.tree.map(jnp.asarray, SlotRows.build([], [], None, num_slots))
        self.requests: list[object | None] = [None] * num_slots
        self.stats = _Stats(generator.cfg)

    @property
    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.requests) if r is None]

    @property
    def busy(self) -> bool:
        return any(r is not None for r in self.requests)

    def insert(self, prompts, sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
               ids: Sequence[object] | None = None, max_new_tokens: int = 16,
               stop_at_eos: bool = True) -> list[SlotEvent]:
        """Prefills the prompts together and puts each into a free slot; returns each request's first token (a
        request with max_new_tokens 1, or whose first token stops it, is finished at once and takes no slot).
        sampling: one SamplingParams for all prompts or one per prompt."""
        g = self.generator
        ids = list(range(len(prompts))) if ids is None else list(ids)
        prompt_ids, params, max_new = g.check_request(
            prompts, max_new_tokens, sampling if isinstance(sampling, SamplingParams) else list(sampling))
        if len(ids) != len(prompt_ids):
            raise RequestError(f"{len(ids)} request ids for {len(prompt_ids)} prompts")
        free = self.free
        if len(prompt_ids) > len(free):
            raise RequestError(f"{len(prompt_ids)} requests for {len(free)} free slots")
        tokens_BT, mask_BT, _ = g.request_shapes(prompt_ids, 1)
        B, T = tokens_BT.shape
        for i, new in enumerate(max_new):
            if T + new > self.cache_len:
                raise RequestError(f"prompt {i}: {T} cache entries (its length bucket) plus max_new_tokens {new} "
                                   f"exceed the slots' cache length {self.cache_len}")
        eos = g.cfg.eos_token_id if stop_at_eos else None
        rows = SlotRows.build(params, max_new, eos, B)
        logits_BV, new_state, stats = g.prefill(tokens_BT, mask_BT, cache_len=T, pad_rows=B - len(prompt_ids))
        self.stats.add(stats)
        tokens_B, _, rows = _advance(logits_BV, rows)
        tokens_B, finished_B = np.asarray(tokens_B), np.asarray(rows.finished_B)
        events, src, dst = [], [], []
        for i, rid in enumerate(ids):
            if not finished_B[i]:
                slot = free[len(dst)]
                src.append(i)
                dst.append(slot)
                self.requests[slot] = rid
            events.append(SlotEvent(rid, dst[-1] if not finished_B[i] else -1, [int(tokens_B[i])],
                                    bool(finished_B[i])))
        if dst:
            src_a, dst_a = np.asarray(src, np.int32), np.asarray(dst, np.int32)
            self.state = g.executor.insert(self.state, new_state, src_a, dst_a)
            self.rows = _put_rows(self.rows, rows, src_a, dst_a)
        return events

    def step(self, num_steps: int = 1) -> list[SlotEvent]:
        """Up to num_steps decode steps over every live slot; returns each live request's new tokens. Finished
        requests leave their slots (released for the next insert)."""
        live = [i for i, r in enumerate(self.requests) if r is not None]
        if not live:
            return []
        out = [[] for _ in range(self.num_slots)]
        self.state, self.rows = self.generator._decode(self.state, self.rows, num_steps, out, self.stats)
        finished_B = np.asarray(self.rows.finished_B)
        events = [SlotEvent(self.requests[i], i, out[i], bool(finished_B[i])) for i in live]
        done = np.asarray([i for i in live if finished_B[i]], np.int32)
        if done.size:
            self.release(done)
        return events

    def release(self, slots) -> None:
        """Frees slots (their requests finished or were cancelled): they compute nothing until reused."""
        slots = np.asarray(slots, np.int32)
        self.state = self.generator.executor.release(self.state, slots)
        self.rows = _finish_rows(self.rows, slots)
        for i in slots.tolist():
            self.requests[i] = None


def _append(out: list[list[int]], tokens_BC: np.ndarray, emitted_BC: np.ndarray) -> None:
    for b, row in enumerate(out):
        row.extend(int(t) for t in tokens_BC[b][emitted_BC[b]])


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="bucket", disable=not enabled)
