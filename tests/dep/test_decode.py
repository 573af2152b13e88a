"""DEP decoding: DEPRuntime.generate (the Engine's contract, a KV cache on the attention group, each prefill and
decode step run as the schedule's task graph) gives the single-device Engine's tokens, token for token, for
DeepSeek-V2 (MLA, shared experts) and Qwen3-MoE (GQA) on splits 3+5 and 4+4 under every schedule (FinDEP's ASAS
with segmented A2E), greedy and sampled; EOS stops each sequence as the Engine's does.

Kept cheap (the CI suite runs on 2 cores): one greedy Engine run per family, one runtime per (family, split) shared
by its schedules, 5 short prompts of different lengths (left padding) and 3 new tokens (two decode steps). With 5
prompts both micro-batches of the pipelined schedules hold real sequences (3 + 2 on 3+5, 4 + 1 on 4+4); the naive
schedule (one micro-batch) runs the first ag prompts, so its micro-batch has the same shape and reuses their
programs (greedy rows are independent: the Engine's tokens for them are the first ag rows).
"""

import dataclasses
import functools

import numpy as np
import pytest

from epsjax.dep import DEPGroups, DEPSchedule
from epsjax.dep.runtime import DEPRuntime
from epsjax.engine import Engine, RequestError, SamplingParams
from epsjax.models import get_preset
from tests.dep.conftest import tiny_model

PROMPTS = [[5, 17, 33], [7], [250, 1], [9, 8, 7, 6], [44, 45]]
NEW = 3
MODELS = ("tiny-deepseek-v2", "tiny-qwen3-moe")
SCHEDULES = (DEPSchedule.pppipe(2), DEPSchedule.findep(2, 2, "AASS"),
             DEPSchedule.findep(2, 2, "ASAS", segment_a2e=True), DEPSchedule.naive())
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=7)


def _until_eos(row, eos):
    """A sequence's tokens up to and including its first EOS."""
    return row[:row.index(eos) + 1] if eos in row else row


@functools.cache
def _reference(name, sampling=SamplingParams()):
    return Engine(tiny_model(name)).generate(PROMPTS, max_new_tokens=NEW, sampling=sampling)


@functools.cache
def _runtime(name, ag, eg):
    return DEPRuntime(tiny_model(name), DEPGroups.split(ag, eg, get_preset(name).num_experts))


@pytest.mark.parametrize("ag,eg", [(3, 5), (4, 4)])
@pytest.mark.parametrize("name", MODELS)
def test_generate_matches_the_engine(name, ag, eg):
    want = _reference(name)
    runtime = _runtime(name, ag, eg)
    K = runtime.cfg.router.top_k
    for schedule in SCHEDULES:
        prompts = PROMPTS[:ag] if schedule.micro_batches == 1 else PROMPTS
        engine = runtime.engine(schedule)
        got = engine.generate(prompts, max_new_tokens=NEW)
        assert got.tokens == want.tokens[:len(prompts)], schedule.describe()
        assert (got.prompt_tokens, got.generated_tokens) == (sum(map(len, prompts)), NEW * len(prompts))
        if prompts == PROMPTS:
            np.testing.assert_array_equal(got.tokens_per_expert, want.tokens_per_expert, err_msg=schedule.describe())
        # prefill + 2 decode steps; in a decode step each sequence sends its K rows of every MoE layer to the
        # expert group and gets them back (batch padding sends nothing)
        assert len(engine.transfer_logs) == NEW
        for log in engine.transfer_logs[1:]:
            for layer in runtime.cfg.moe_layers:
                for kind in ("a2e", "e2a"):
                    rows = sum(r.rows for r in log.records if r.kind == kind and r.layer == layer)
                    assert rows == len(prompts) * K, (schedule.describe(), kind, layer)


def test_sampled_generate_matches_the_engine():
    """Temperature 0.8, top-p 0.9, seed 7: the same sampling keys per step as the Engine, so the same tokens."""
    want = _reference("tiny-deepseek-v2", SAMPLED)
    assert want.tokens != _reference("tiny-deepseek-v2").tokens  # sampling did change something
    got = _runtime("tiny-deepseek-v2", 3, 5).generate(PROMPTS, max_new_tokens=NEW, sampling=SAMPLED,
                                                     schedule=DEPSchedule.findep(2, 2, "AASS"))
    assert got.tokens == want.tokens
    np.testing.assert_array_equal(got.tokens_per_expert, want.tokens_per_expert)


def test_eos_stops_each_sequence():
    """EOS = a greedy token some sequence first produces after its first step: that sequence stops there (EOS
    included), every other at its first EOS if any: the Engine's tokens cut at EOS."""
    want = _reference("tiny-qwen3-moe").tokens
    seq, step = next((i, t) for i, row in enumerate(want) for t in range(1, len(row)) if row[t] not in row[:t])
    eos = want[seq][step]
    engine = _runtime("tiny-qwen3-moe", 4, 4).engine(DEPSchedule.findep(2, 2, "AASS"))
    engine.cfg = dataclasses.replace(engine.cfg, eos_token_id=eos)
    got = engine.generate(PROMPTS, max_new_tokens=NEW)
    assert got.tokens == [_until_eos(row, eos) for row in want]
    assert got.tokens[seq] == want[seq][:step + 1] and len(got.tokens[seq]) < NEW


def test_engine_contract_errors():
    engine = _runtime("tiny-qwen3-moe", 4, 4).engine()
    with pytest.raises(RequestError, match="last position's logits"):
        engine.prefill(np.ones((2, 4), np.int32), all_logits=True)
    with pytest.raises(RequestError, match="DEPState"):
        engine.decode_step(object(), [1, 2])
    with pytest.raises(RequestError, match="DEPSchedule"):
        _runtime("tiny-qwen3-moe", 4, 4).engine("findep")
