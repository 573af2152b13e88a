"""Shared, session-scoped pieces for the offload tests: a tiny Mixtral, its routing traces, a trained predictor."""

import numpy as np
import pytest
from flax import nnx

from epsjax.offload import traces
from epsjax.offload.predictor import PredictorConfig, train_predictor
from epsjax.offload.runtime import OffloadConfig, OffloadEngine
from epsjax.models import MoETransformer, get_preset

PRESET = "tiny-mixtral"


@pytest.fixture(scope="session")
def tiny_model():
    return MoETransformer(get_preset(PRESET), rngs=nnx.Rngs(0))


@pytest.fixture(scope="session")
def tiny_traces(tiny_model):
    """tokens [320, 32] from the synthetic corpus and their routing ids [320, 32, 3, 2]."""
    engine = OffloadEngine(tiny_model, OffloadConfig(mode="device"), record_routing=True)
    tokens = traces.synthetic_corpus(tiny_model.cfg.vocab_size, 320, 32, seed=0)
    return tokens, traces.collect_traces(engine, tokens, batch_size=64)


@pytest.fixture(scope="session")
def trained(tiny_model, tiny_traces):
    """(predictor, held-out tokens, held-out ids), trained on 80% of the traces."""
    (train_tokens, train_ids), (test_tokens, test_ids) = traces.split(*tiny_traces, held_out=0.2)
    config = PredictorConfig.for_model(tiny_model.cfg, enc_layers=1)  # one block is enough here, and quick
    predictor, _ = train_predictor(train_tokens, train_ids, config, steps=200)
    return predictor, test_tokens, test_ids


def prompts_from(tokens: np.ndarray, count: int, seed: int = 0) -> list[list[int]]:
    """`count` prompts of random lengths (2..20) cut from corpus rows."""
    rng = np.random.default_rng(seed)
    return [tokens[i % len(tokens), :rng.integers(2, 21)].tolist() for i in range(count)]
