"""Bad input gets a clear error that names what is wrong: checkpoints, requests, presets."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from epsjax.checkpoint import CheckpointError, load_checkpoint
from epsjax.engine import Engine, SamplingParams
from models import get_preset
from models.transformer import MoETransformer

FIXTURE = Path(__file__).parent / "fixtures" / "hf" / "qwen3_moe"


@pytest.fixture
def checkpoint(tmp_path):
    """A writable copy of a real (transformers-made) checkpoint, to damage."""
    path = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, path)
    (path / "expected.safetensors").unlink()
    return path


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load_checkpoint(checkpoint, progress=False)


def test_unexpected_tensor_is_named(checkpoint):
    _rewrite(checkpoint, lambda t: t.update({"model.layers.1.mlp.experts.99.up_proj.weight": np.zeros((2, 2))}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*experts\.99\.up_proj\.weight"):
        load_checkpoint(checkpoint, progress=False)


def test_misshaped_tensor_names_both_shapes(checkpoint):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:-1]
    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight has shape \(95, 64\), expected \(96, 64\)"):
        load_checkpoint(checkpoint, progress=False)


def test_pickled_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model\.bin\).*arbitrary code"):
        load_checkpoint(checkpoint, progress=False)


def test_missing_shard_file_is_named(tmp_path):
    path = tmp_path / "mixtral"
    shutil.copytree(FIXTURE.parent / "mixtral", path)
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: .*{shard}"):
        load_checkpoint(path, progress=False)


def test_unknown_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'.*supported: mixtral"):
        load_checkpoint(checkpoint, progress=False)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path, progress=False)


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset 'mixtral-8x8b'; known presets: .*mixtral-8x7b"):
        get_preset("mixtral-8x8b")


@pytest.fixture(scope="module")
def engine():
    from flax import nnx
    return Engine(MoETransformer(get_preset("tiny-qwen3-moe", max_seq_len=32), rngs=nnx.Rngs(0)))


def test_out_of_range_token_ids(engine):
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 256\): \[-1, 256\]"):
        engine.generate([[1, 2, 256], [-1, 3]])
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        engine.prefill(np.array([[1, 999]]))


def test_empty_batch_and_empty_prompt(engine):
    with pytest.raises(ValueError, match="empty batch"):
        engine.generate([])
    with pytest.raises(ValueError, match=r"prompts \[1\] are empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(ValueError, match="non-empty"):
        engine.prefill(np.zeros((0, 4), np.int32))


def test_prompt_longer_than_cache(engine):
    with pytest.raises(ValueError, match=r"prompt length 40 exceeds the cache length 32"):
        engine.prefill(np.ones((1, 40), np.int32))
    with pytest.raises(ValueError, match=r"plus max_new_tokens 20 exceeds the model's maximum sequence length 32"):
        engine.generate([[1] * 16], max_new_tokens=20)


def test_full_cache_is_an_error_not_an_overwrite(engine):
    _, state, _ = engine.prefill(np.ones((1, 8), np.int32), cache_len=9)
    _, state, _ = engine.decode_step(state, [3])
    with pytest.raises(ValueError, match=r"KV cache is full \(9 slots\)"):
        engine.decode_step(state, [3])


def test_bad_sampling_parameters():
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
