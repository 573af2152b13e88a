"""Arctic has no transformers class: it is checked against a numpy per-expert loop reading the HF-layout checkpoint."""

import jax
import numpy as np
from flax import nnx

from epsjax.checkpoint import load_checkpoint, save_checkpoint
from epsjax.engine import Engine
from epsjax.models import MoETransformer, get_preset
from tests.models.arctic_reference import arctic_logits


def test_arctic_matches_reference_loop(tmp_path):
    cfg = get_preset("tiny-arctic", num_layers=2)
    # Larger weights than the default init so that routing and attention are far from uniform.
    model = MoETransformer(cfg, rngs=nnx.Rngs(7))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(3), len(jax.tree.leaves(state))))
    scaled = jax.tree.map(lambda p: p * 6.0 if p.ndim > 1 else p + 0.1 * jax.random.normal(next(keys), p.shape), state)
    nnx.update(model, scaled)
    save_checkpoint(model, tmp_path / "arctic")
    engine = Engine(load_checkpoint(tmp_path / "arctic", progress=False))

    tokens = np.array([[5, 17, 99, 3, 250, 42, 42, 7, 128, 64]], np.int32)
    logits, _, _ = engine.prefill(tokens, all_logits=True)
    expected = arctic_logits(tmp_path / "arctic", tokens[0].tolist())
    assert np.abs(expected).max() > 1.0, "reference logits too small to be a meaningful check"
    np.testing.assert_allclose(np.asarray(logits[0]), expected, atol=2e-4, rtol=1e-4)
