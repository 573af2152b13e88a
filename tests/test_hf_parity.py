"""Every family loads through the real loader from transformers-made fixtures and matches transformers' outputs.

Fixtures are built by scripts/make_hf_fixtures.py with transformers' own classes (tiny random weights, float32).
"""

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from epsjax.checkpoint import load_checkpoint
from epsjax.engine import Engine
from epsjax.models import LocalExperts

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FAMILIES = ["mixtral", "deepseek_v2_lora", "deepseek_v2_nolora", "qwen3_moe", "dbrx"]
LOGIT_TOL = 1e-4  # float32; transformers' own eager path is the oracle


@pytest.fixture(scope="module", params=[(f, b) for f in FAMILIES for b in ("auto", "reference")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def loaded(request):
    """(name, engine, expected) for each family, with the default expert backend and the plain-jnp reference."""
    family, backend = request.param
    path = FIXTURES / family
    engine = Engine(load_checkpoint(path, dtype="float32", progress=False), experts=LocalExperts(backend=backend))
    return family, engine, load_file(str(path / "expected.safetensors"))


def test_logits_match_transformers(loaded):
    name, engine, expected = loaded
    logits, _, _ = engine.prefill(expected["input_ids"], all_logits=True)
    err = np.abs(np.asarray(logits) - expected["logits"]).max()
    assert err < LOGIT_TOL, f"{name}: max |logits - transformers| = {err}"


def test_padded_logits_match_transformers(loaded):
    name, engine, expected = loaded
    mask = expected["padded_attention_mask"].astype(bool)
    logits, _, _ = engine.prefill(expected["padded_input_ids"], mask, all_logits=True)
    err = np.abs(np.asarray(logits) - expected["padded_logits"])[mask].max()
    assert err < LOGIT_TOL, f"{name}: max |padded logits - transformers| = {err}"


def test_greedy_continuation_matches_transformers(loaded):
    name, engine, expected = loaded
    result = engine.generate(expected["input_ids"].tolist(), max_new_tokens=6, stop_at_eos=False)
    np.testing.assert_array_equal(np.array(result.tokens), expected["greedy"], err_msg=name)


def test_padded_greedy_continuation_matches_transformers(loaded):
    name, engine, expected = loaded
    ids, mask = expected["padded_input_ids"], expected["padded_attention_mask"].astype(bool)
    prompts = [row[m].tolist() for row, m in zip(ids, mask)]  # ragged prompts; the engine left-pads them itself
    result = engine.generate(prompts, max_new_tokens=6, stop_at_eos=False)
    np.testing.assert_array_equal(np.array(result.tokens), expected["padded_greedy"], err_msg=name)
