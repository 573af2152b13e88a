"""Bounded compilation under mixed traffic (issue 18): shape buckets bound the programs an engine compiles, whatever
the requests, without changing outputs; warm-up compiles a bucket ahead of traffic; the persistent compilation cache
serves a second process."""

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from epsjax import sharding
from epsjax import placement
from epsjax.compilation import CompileCounter, ShapeBuckets
from epsjax.engine import Engine, RequestError
from epsjax.offload.runtime import OFFLOAD_PROGRAMS_PER_SHAPE, OffloadConfig, OffloadEngine
from epsjax.models import MoETransformer, get_preset

ROOT = Path(__file__).resolve().parents[2]
# Programs generate compiles besides prefill, decode loop and sampler, once per process (PRNG key set-up and the
# like): what the bound allows on top of ShapeBuckets.program_bound.
HELPERS = 8


@pytest.fixture(scope="module")
def model():
    return MoETransformer(get_preset("tiny-mixtral"), rngs=nnx.Rngs(0))


def mixed_requests(n, *, max_batch, max_prompt, max_new, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [([rng.integers(0, vocab, int(rng.integers(1, max_prompt + 1))).tolist()
              for _ in range(int(rng.integers(1, max_batch + 1)))], int(rng.integers(1, max_new + 1)))
            for _ in range(n)]


def run(engine, requests):
    return [engine.generate(prompts, max_new_tokens=new).tokens for prompts, new in requests]


def bound(buckets, max_prompt, max_new, max_batch, multiple=1):
    return sum(buckets.program_bound(max_prompt + max_new, max_batch, multiple).values()) + HELPERS


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_buckets_round_up_to_the_ladders():
    b = ShapeBuckets(batch=(1, 2, 4, 8), min_length=16)
    assert [b.batch_size(n) for n in (1, 2, 3, 5, 8, 9, 17)] == [1, 2, 4, 8, 8, 16, 24]
    assert b.batch_size(3, multiple=4) == 4 and b.batch_size(5, multiple=4) == 8
    assert [b.length(t) for t in (1, 16, 17, 100, 256, 257)] == [16, 16, 32, 128, 256, 512]
    # tiny-mixtral (max_seq_len 256), batches up to 8: 4 batch sizes x 5 prompt lengths x their cache lengths
    shapes = b.shapes(256, 8)
    assert {s[0] for s in shapes} == {1, 2, 4, 8} and {s[1] for s in shapes} == {16, 32, 64, 128, 256}
    assert all(c >= t + 1 for _, t, c in shapes)
    assert b.program_bound(256, 8) == {"prefill": len(shapes), "decode": len({(s[0], s[2]) for s in shapes}),
                                       "sample": 4}
    for bad in (dict(batch=()), dict(batch=(2, 1)), dict(batch=(0,)), dict(min_length=12)):
        with pytest.raises(ValueError, match="ShapeBuckets"):
            ShapeBuckets(**bad)


def test_mixed_traffic_on_one_device_stays_within_the_bound_with_unchanged_outputs(model):
    buckets = ShapeBuckets()
    requests = mixed_requests(120, max_batch=8, max_prompt=60, max_new=12)
    engine = Engine(model, buckets=buckets)
    with CompileCounter() as first:
        outputs = run(engine, requests[:60])
    after_first = rss_mib()
    with CompileCounter() as second:
        outputs += run(engine, requests[60:])
    limit = bound(buckets, 60, 12, 8)
    assert first.programs + second.programs <= limit, (first.programs, second.programs, limit)
    assert second.programs <= first.programs // 4  # most buckets were seen in the first half
    assert rss_mib() - after_first < 200  # no executable or buffer leak per request
    # Outputs equal the unbucketed engine's (exact batches, prompts padded to a multiple of 8) on a sample.
    reference = Engine(model, buckets=None)
    for i in range(0, 120, 24):
        prompts, new = requests[i]
        assert reference.generate(prompts, max_new_tokens=new).tokens == outputs[i], i


def test_mixed_traffic_through_expert_parallelism_stays_within_the_bound(model):
    cfg = model.cfg
    mesh = sharding.make_mesh(tensor=2, expert=4)
    experts, _ = placement.ep_experts(cfg, mesh, "tp_ep", batch=8, seq_len=32)
    sharded = placement.create_sharded_model(cfg, mesh, "tp_ep", 0)
    buckets = ShapeBuckets(batch=(4, 8))
    engine = Engine(sharded, experts=experts, batch_sharding=sharding.batch_sharding(mesh, "tp_ep"), buckets=buckets)
    requests = mixed_requests(80, max_batch=8, max_prompt=30, max_new=8, seed=1)
    with CompileCounter() as compiled:
        outputs = run(engine, requests)
    assert compiled.programs <= bound(buckets, 30, 8, 8, multiple=4), compiled.programs
    local = Engine(model, buckets=None)
    for i in (0, 37, 79):  # the same tokens as the single-device, unbucketed engine
        prompts, new = requests[i]
        assert local.generate(prompts, max_new_tokens=new).tokens == outputs[i], i


def test_mixed_traffic_through_the_offload_engine_stays_within_the_bound(model):
    buckets = ShapeBuckets(batch=(2, 4))
    engine = OffloadEngine(model, OffloadConfig(mode="lru", budget_fraction=0.5), buckets=buckets)
    requests = mixed_requests(60, max_batch=4, max_prompt=30, max_new=6, seed=2)
    with CompileCounter() as compiled:
        outputs = run(engine, requests)
    # layer by layer: at most OFFLOAD_PROGRAMS_PER_SHAPE programs per prefill (batch, prompt, cache) and decode
    # (batch, cache) bucket, plus the expert store's copy programs and the helpers
    bound = buckets.program_bound(36, 4)
    limit = OFFLOAD_PROGRAMS_PER_SHAPE * (bound["prefill"] + bound["decode"]) + 16 + HELPERS
    assert compiled.programs <= limit, (compiled.programs, limit)
    reference = Engine(model, buckets=None)
    for i in (0, 31, 59):
        prompts, new = requests[i]
        assert reference.generate(prompts, max_new_tokens=new).tokens == outputs[i], i


def test_warmup_compiles_a_bucket_ahead_of_its_traffic(model):
    engine = Engine(model)
    records = engine.warmup((3,), (20,), (5,), progress=False)
    assert [(r["batch"], r["prompt_length"], r["cache_length"]) for r in records] == [(4, 32, 64)]
    with CompileCounter() as compiled:  # any request in that bucket now compiles nothing
        engine.generate([[5] * 17, [6] * 30, [7] * 25], max_new_tokens=5)
        engine.generate([[5] * 20] * 4, max_new_tokens=3)
    assert compiled.programs == 0
    with pytest.raises(RequestError, match="warmup: prompt length 250 plus 16 new tokens exceeds"):
        engine.warmup((1,), (250,), (16,), progress=False)


def test_a_second_process_loads_its_programs_from_the_persistent_cache(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "epsjax.cli", "generate", "--preset", "tiny-mixtral", "--batch", "2",
           "--prompt-len", "8", "--max-new-tokens", "3", "--compile-cache", str(tmp_path / "cache")]
    lines = []
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        lines.append(re.search(r"compile +(\d+) programs .*; (\d+) loaded from the persistent cache", done.stdout))
    cold, warm = ((int(m.group(1)), int(m.group(2))) for m in lines)
    assert cold[0] > 0 and cold[1] == 0
    assert warm[0] == cold[0] and warm[1] == warm[0]  # every program loaded, none compiled
