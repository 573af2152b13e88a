"""The committed checkpoint trained on the Python standard library (scripts/train_tiny_moe.py): it loads through the
real loader, has learned Python (far below the random model's loss on code it never saw), its routers have structure
a random model's lack, and the command line generates readable code from it."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from epsjax.checkpoint import load_checkpoint
from epsjax.cli import main
from epsjax.engine import Engine
from epsjax.offload import metrics, traces
from epsjax.offload.runtime import OffloadConfig, OffloadEngine
from models import MoETransformer

CHECKPOINT = Path(__file__).parents[2] / "checkpoints" / "pystdlib-moe"

# Written for this test (not from the standard library): code the model has not been trained on.
SNIPPET = '''def read_config(path, defaults=None):
    """Return the settings in the file at path, merged over defaults."""
    settings = dict(defaults or {})
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, item):
        self.counts[item] = self.counts.get(item, 0) + 1
        return self.counts[item]
'''


@pytest.fixture(scope="module")
def trained():
    return load_checkpoint(CHECKPOINT, dtype="float32", progress=False)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(CHECKPOINT / "tokenizer.json"))


def test_checkpoint_is_small_and_in_the_hf_layout():
    files = {p.name for p in CHECKPOINT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert sum(p.stat().st_size for p in CHECKPOINT.iterdir()) <= 25 * 2**20
    hf = json.loads((CHECKPOINT / "config.json").read_text())
    assert hf["model_type"] == "mixtral" and hf["num_local_experts"] >= 8 and hf["num_experts_per_tok"] == 2


def cross_entropy(model, ids) -> float:
    engine = Engine(model)
    tokens = np.asarray(ids, np.int32)[None]
    logits, _, _ = engine.prefill(tokens, np.ones(tokens.shape, bool), all_logits=True)
    logp = np.asarray(logits[0, :-1], np.float64)
    logp = logp - np.log(np.exp(logp - logp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logp.max(
        -1, keepdims=True)
    return float(-np.mean(logp[np.arange(len(ids) - 1), ids[1:]]))


def test_it_has_learned_python(trained, tokenizer):
    ids = tokenizer.encode(SNIPPET).ids
    random_model = MoETransformer(trained.cfg, rngs=nnx.Rngs(0))
    ce, ce_random = cross_entropy(trained, ids), cross_entropy(random_model, ids)
    assert ce_random > math.log(trained.cfg.vocab_size) - 0.5  # a random model is near uniform
    assert ce < 2.6, (ce, ce_random)  # perplexity under ~13 on unseen code


def test_routing_has_structure_a_random_model_lacks(trained, tokenizer):
    ids = np.asarray(tokenizer.encode(SNIPPET * 2).ids[:192], np.int32).reshape(3, 64)
    E = trained.cfg.num_experts

    def stats(model):
        engine = OffloadEngine(model, OffloadConfig(mode="device"), record_routing=True, buckets=None)
        return metrics.router_statistics(traces.collect_traces(engine, ids, batch_size=3), E)

    ours, theirs = stats(trained), stats(MoETransformer(trained.cfg, rngs=nnx.Rngs(0)))
    # a trained router predicts its next layer's choice better than a random one does
    assert np.mean(ours["next_layer_top1"]) > np.mean(theirs["next_layer_top1"])
    assert np.min(ours["load_entropy"]) > 0.8  # and spreads its load (the balancing loss)


def test_cli_generates_code_from_a_text_prompt(capsys):
    assert main(["generate", "--model", str(CHECKPOINT), "--prompt", "def ", "--max-new-tokens", "24",
                 "--no-compile-cache"]) == 0
    out = capsys.readouterr().out
    text = out[out.index("text[0]"):]
    assert "  | def " in text
    assert "(" in text  # a function signature, at least
