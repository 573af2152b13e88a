"""DEP on 8 CPU devices gives the single-device logits: DeepSeek-V2 (MLA, shared experts, 16 experts) and
Qwen3-MoE (GQA, no shared experts, 16 experts), attention/expert splits 3+5 (16 experts over 5 expert devices:
3, 3, 3, 3, 4) and 4+4, every schedule. Also: the A2E/E2A move exactly the routed rows, a skewed router (every
token to the same few experts, most expert devices receive nothing) and serialized execution.

Shapes are chosen so compilations are shared: B = 2 * ag sequences of T = 8 tokens, so every pipelined schedule
(r1 = 2) has one sequence per attention device per micro-batch and the naive one two.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from epsjax.dep import DEPGroups, DEPSchedule
from epsjax.dep.runtime import DEPRuntime, _Dispatcher
from epsjax.engine import Engine
from tests.dep.conftest import tiny_model

T = 8
SPLITS = ((3, 5), (4, 4))
SCHEDULES = {
    "naive": DEPSchedule.naive(),
    "pppipe": DEPSchedule.pppipe(2),
    "findep_aass": DEPSchedule.findep(2, 2, "AASS"),
    "findep_asas": DEPSchedule.findep(2, 3, "ASAS"),
    "findep_segmented_a2e": DEPSchedule.findep(2, 2, "AASS", segment_a2e=True),
}
MODELS = ("tiny-deepseek-v2", "tiny-qwen3-moe")


def _inputs(batch):
    rng = np.random.default_rng(batch)
    tokens = rng.integers(1, 256, (batch, T)).astype(np.int32)
    mask = np.ones((batch, T), bool)
    mask[1, :3] = False  # left padding: never routed, never attended to
    return tokens, mask


@functools.cache
def _model(name, skewed=False):
    model = tiny_model(name)
    if skewed:
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, _skew(state))
    return model


@functools.cache
def _reference(name, batch, skewed=False):
    engine = Engine(_model(name, skewed))
    logits, _, stats = engine.prefill(*_inputs(batch), all_logits=True, cache_len=T)
    return np.asarray(logits), np.asarray(stats.tokens_per_expert)


def _skew(state):
    """Every router kernel zeroed: all experts tie and top-k picks the first K for every token."""
    return jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if "kernel_DE" in jax.tree_util.keystr(path) else v, state)


@functools.cache
def _runtime(name, ag, eg, skewed=False):
    model = _model(name, skewed)
    return DEPRuntime(model, DEPGroups.split(ag, eg, model.cfg.num_experts))


def _check_rows(runtime, out, tokens_per_expert):
    """A2E moved, per MoE layer and expert device, exactly the (token, k) rows routed to that device's experts;
    E2A moved the same rows back; each row is D float32 values."""
    groups, cfg = runtime.groups, runtime.cfg
    owner = groups.placement.owner()
    for i, layer in enumerate(cfg.moe_layers):
        want = [int(tokens_per_expert[i, owner == e].sum()) for e in range(groups.eg)]
        for kind, dest in (("a2e", lambda r: r.dest), ("e2a", lambda r: r.source)):
            got = [0] * groups.eg
            for r in out.transfers.records:
                if r.kind == kind and r.layer == layer:
                    got[dest(r)] += r.rows
                    assert r.nbytes == r.rows * cfg.d_model * 4
            assert got == want, (kind, layer)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("ag,eg", SPLITS)
@pytest.mark.parametrize("name", MODELS)
def test_dep_matches_single_device(name, ag, eg, schedule):
    batch = 2 * ag
    runtime = _runtime(name, ag, eg)
    want_logits, want_counts = _reference(name, batch)
    tokens, mask = _inputs(batch)
    out = runtime.prefill(tokens, mask, schedule=SCHEDULES[schedule])
    err = np.abs(np.asarray(out.logits) - want_logits)[mask].max()
    assert err < 1e-5, f"{name} {ag}+{eg} {schedule}: max |logits diff| = {err}"
    np.testing.assert_array_equal(out.tokens_per_expert, want_counts)
    _check_rows(runtime, out, want_counts)
    # segmented A2E: one transfer per (segment, attention device, expert device), logged with its segment
    segments = {r.segment for r in out.transfers.records if r.kind == "a2e"}
    assert segments == (set(range(SCHEDULES[schedule].segments)) if SCHEDULES[schedule].segment_a2e else {-1})


@pytest.mark.parametrize("name", MODELS)
def test_skewed_router_leaves_most_expert_devices_idle(name):
    """All router weights zero: every valid token picks experts 0..K-1. With 3+5 (3 experts on device 0) the
    K = 4 (DeepSeek) rows go 3 to device 0 and 1 to device 1; K = 8 (Qwen3) reach device 2 too; the other
    devices receive nothing, and empty transfers are skipped, not sent as zero-row arrays."""
    batch = 6
    runtime = _runtime(name, 3, 5, skewed=True)
    want_logits, want_counts = _reference(name, batch, skewed=True)
    tokens, mask = _inputs(batch)
    out = runtime.prefill(tokens, mask, schedule=SCHEDULES["findep_aass"])
    assert np.abs(np.asarray(out.logits) - want_logits)[mask].max() < 1e-5
    np.testing.assert_array_equal(out.tokens_per_expert, want_counts)
    K, valid = runtime.cfg.router.top_k, int(mask.sum())
    expected = {0: 3 * valid, 1: min(K - 3, 3) * valid, 2: max(K - 6, 0) * valid}
    for layer in runtime.cfg.moe_layers:
        got = {}
        for r in out.transfers.records:
            if r.kind == "a2e" and r.layer == layer:
                got[r.dest] = got.get(r.dest, 0) + r.rows
        assert got == {e: n for e, n in expected.items() if n}, layer
    _check_rows(runtime, out, want_counts)


def test_serialized_execution_gives_the_same_logits():
    """Blocking after every task (no overlap between the groups) changes timing, not results; either way each device
    queue receives its tasks in the schedule's order."""
    runtime = _runtime("tiny-deepseek-v2", 4, 4)
    tokens, mask = _inputs(8)
    schedule = SCHEDULES["findep_aass"]
    overlapped = runtime.prefill(tokens, mask, schedule=schedule)
    serialized = runtime.prefill(tokens, mask, schedule=schedule, serialize=True)
    np.testing.assert_array_equal(np.asarray(overlapped.logits), np.asarray(serialized.logits))
    tasks = schedule.tasks(("dense", "moe", "moe"), shared=True)
    assert [name for name, _ in serialized.issue_times] == [t.name for t in tasks]
    queue = {t.name: _Dispatcher.QUEUE.get(t.kind, "attention") for t in tasks}
    issued = [name for name, _ in overlapped.issue_times]
    assert sorted(issued) == sorted(queue)
    for q in set(queue.values()):
        assert [n for n in issued if queue[n] == q] == [t.name for t in tasks if queue[t.name] == q], q


def test_groups_must_cover_the_model_experts():
    with pytest.raises(ValueError, match="place 8 experts"):
        DEPRuntime(tiny_model("tiny-qwen3-moe"), DEPGroups.split(4, 4, 8))


def test_prompt_lengths_in_one_bucket_share_their_programs():
    """The runtime rounds prompt lengths (more left padding) and micro-batch sizes up to ShapeBuckets' ladders: a
    second prompt length in the same bucket compiles no new step program (embedding, attention, combine, head),
    and the logits of the real positions are unchanged. (The expert step compiles per power-of-two bucket of the
    rows it receives; the A2E / E2A slice and place per power-of-two chunk size: they move exactly the routed rows,
    see test_transfers_go_in_power_of_two_chunks.)"""
    from epsjax.dep import steps

    jitted = [getattr(steps, name) for name in ("embed", "head", "dense", "attention", "shared", "combine_layer")]
    runtime = _runtime("tiny-deepseek-v2", 4, 4)
    schedule = SCHEDULES["naive"]
    tokens, mask = _inputs(8)
    runtime.prefill(tokens, mask, schedule=schedule)  # compiles the bucket of this prompt length
    before = [f._cache_size() for f in jitted]
    shorter_tokens, shorter_mask = tokens[:, 3:], mask[:, 3:]
    out = runtime.prefill(shorter_tokens, shorter_mask, schedule=schedule)
    assert runtime.buckets.length(tokens.shape[1]) == runtime.buckets.length(shorter_tokens.shape[1])
    assert [f._cache_size() for f in jitted] == before and out.logits.shape[:2] == shorter_tokens.shape
    exact = DEPRuntime(tiny_model("tiny-deepseek-v2"), runtime.groups, buckets=None)
    want = np.asarray(exact.prefill(shorter_tokens, shorter_mask, schedule=schedule).logits)
    assert np.abs(np.asarray(out.logits) - want)[shorter_mask].max() < 1e-5


def test_transfers_go_in_power_of_two_chunks():
    """A piece of n rows is sent as the chunks of n's binary expansion, so slicing compiles once per chunk size
    (at most log2(n) + 1 of them), and the chunks cover the n rows exactly once, in order."""
    from epsjax.dep import transfer

    assert transfer.chunks(13) == [(0, 8), (8, 4), (12, 1)]
    assert transfer.chunks(8) == [(0, 8)] and transfer.chunks(1) == [(0, 1)] and transfer.chunks(0) == []
    for n in range(1, 300):
        parts = transfer.chunks(n)
        assert [at for at, _ in parts] == list(np.cumsum([0] + [size for _, size in parts])[:-1])
        assert sum(size for _, size in parts) == n and len(parts) == bin(n).count("1")
    x = jnp.arange(40.0).reshape(20, 2)
    device = jax.devices()[1]
    sent = transfer.send(x, 3, 7, device)
    assert [(at, p.shape[0]) for at, p in sent] == [(0, 4), (4, 2), (6, 1)]
    assert all(p.devices() == {device} for _, p in sent)
    np.testing.assert_array_equal(np.concatenate([np.asarray(p) for _, p in sent]), np.asarray(x[3:10]))


def test_segments_split_the_valid_tokens():
    """Pack's r2 segments are contiguous runs of the device's valid tokens, not of positions: with left padding a
    split by position would leave the first segments empty. 6 tokens, the first 2 padding, 4 experts on 2 devices
    (2 slots each), top-1: tokens 2, 3 form segment 0 and tokens 4, 5 segment 1. Keys (device, segment, slot):
    token 2 -> expert 1 (0, 0, 1); token 3 -> expert 2 (1, 0, 0); token 4 -> expert 3 (1, 1, 1); token 5 -> expert 0
    (0, 1, 0); so the sorted rows are tokens 2, 5, 3, 4, then the padding's (never sent)."""
    from epsjax.dep import steps

    pack = steps.Pack(owner=(0, 0, 1, 1), slot=(0, 1, 0, 1), devices=2, slots=2, segments=2)
    x_TD = jnp.arange(6.0)[:, None]
    ids_TK = jnp.array([[0], [0], [1], [2], [3], [0]])
    valid_T = jnp.array([False, False, True, True, True, True])
    x_sorted, _, counts = pack(x_TD, ids_TK, valid_T)
    np.testing.assert_array_equal(np.asarray(x_sorted[:4, 0]), [2, 5, 3, 4])
    np.testing.assert_array_equal(np.asarray(counts[0]), [[[0, 1], [1, 0]], [[1, 0], [0, 1]]])
