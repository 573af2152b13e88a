"""Bad input gets one clear error naming what is wrong, of the type of its layer (epsjax.errors): checkpoint files
and tensors, config.json fields, requests, plans and meshes, kernels. Each case stands for a class of them."""

import builtins
import json
import math
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from epsjax import pallas_kernels as pk
from epsjax import sharding
from epsjax.checkpoint import CheckpointError, load_checkpoint, read_config
from epsjax.engine import Engine, RequestError, SamplingParams
from epsjax.errors import EpsjaxError
from epsjax.models import ConfigError, get_preset
from epsjax.models.transformer import MoETransformer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
FIXTURE = FIXTURES / "qwen3_moe"


def copy_fixture(tmp_path, name="qwen3_moe"):
    """A writable copy of a real (transformers-made) checkpoint, to damage."""
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    if (path / "expected.safetensors").exists():
        (path / "expected.safetensors").unlink()
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return copy_fixture(tmp_path)


def _rewrite(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DELETE]:
        del config[key]
    (path / "config.json").write_text(json.dumps(config))


_DELETE = object()


def _write_safetensors(file: Path, header: dict, data: bytes):
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_every_error_type_is_an_epsjax_error_and_a_value_error():
    for error in (CheckpointError, ConfigError, RequestError, sharding.PlanError, pk.KernelError):
        assert issubclass(error, EpsjaxError) and issubclass(error, ValueError)


# Checkpoint files --------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("keep", [4, 100, 0.5, -1], ids=["4 bytes", "100 bytes", "half", "one byte short"])
def test_truncated_safetensors_file_is_named(checkpoint, keep):
    file = checkpoint / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)] if isinstance(keep, float) else data[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        load_checkpoint(checkpoint, progress=False)


def test_safetensors_header_that_is_not_json(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(struct.pack("<Q", 12) + b"not json at!" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the safetensors header is not valid JSON"):
        load_checkpoint(checkpoint, progress=False)


def test_header_offsets_that_do_not_match_the_shape(tmp_path):
    file = tmp_path / "x.safetensors"
    _write_safetensors(file, {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}, b"\0" * 24)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: tensor w: data_offsets \[0, 20\] hold 20 bytes, "
                                              r"but shape \[2, 3\] of F32 needs 24"):
        from epsjax.checkpoint import read_header
        read_header(file)


def test_overlapping_tensors_in_a_header(tmp_path):
    from epsjax.checkpoint import read_header
    file = tmp_path / "x.safetensors"
    _write_safetensors(file, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12)
    with pytest.raises(CheckpointError, match=r"tensors a and b overlap"):
        read_header(file)
    _write_safetensors(file, {"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"tensor a: unknown dtype 'Q4'"):
        read_header(file)


def test_pickled_checkpoint_is_refused(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model\.bin\).*arbitrary code"):
        load_checkpoint(checkpoint, progress=False)


def test_shard_index_problems_are_named(tmp_path):
    path = copy_fixture(tmp_path, "mixtral")
    index = path / "model.safetensors.index.json"
    table = json.loads(index.read_text())
    shard = table["weight_map"]["lm_head.weight"]
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"index\.json: no weight_map object"):
        load_checkpoint(path, progress=False)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index\.json: the shard index is not valid JSON"):
        load_checkpoint(path, progress=False)
    moved = dict(table["weight_map"])
    moved["lm_head.weight"] = next(f for f in set(moved.values()) if f != shard)
    index.write_text(json.dumps({**table, "weight_map": moved}))
    with pytest.raises(CheckpointError, match=r"places tensor lm_head\.weight in .*whose header does not declare"):
        load_checkpoint(path, progress=False)
    index.write_text(json.dumps(table))
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist: .*{shard}"):
        load_checkpoint(path, progress=False)


def test_files_that_are_not_files(checkpoint, tmp_path):
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: model\.safetensors is not a regular file"):
        load_checkpoint(checkpoint, progress=False)
    (checkpoint / "model.safetensors").rmdir()
    (checkpoint / "model.safetensors").symlink_to(tmp_path / "gone.safetensors")
    with pytest.raises(CheckpointError, match=r"broken symbolic link"):
        load_checkpoint(checkpoint, progress=False)
    with pytest.raises(CheckpointError, match=r"not a directory"):
        load_checkpoint(checkpoint / "config.json", progress=False)


def test_unreadable_file_reports_why(checkpoint, monkeypatch):
    # (Tests run as root here, where permissions do not stop reads: the OS error is injected.)
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):
        if str(file).endswith("model.safetensors"):
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read: Permission denied"):
        load_checkpoint(checkpoint, progress=False)


# Checkpoint tensors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,label", [(np.int8, "I8"), (np.bool_, "BOOL"), (np.int32, "I32")])
def test_integer_and_bool_tensors_are_refused(checkpoint, dtype, label):
    def edit(t):
        name = "model.layers.1.mlp.experts.2.down_proj.weight"
        t[name] = t[name].astype(dtype)
    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=rf"experts\.2\.down_proj\.weight has dtype {label}; weights must be "
                                              r"floating point"):
        load_checkpoint(checkpoint, progress=False)


def test_quantized_checkpoint_is_refused(checkpoint):
    _edit_config(checkpoint, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(CheckpointError, match=r"quantization_config \(quant_method 'gptq'\)"):
        load_checkpoint(checkpoint, progress=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_tensor_is_named_or_loaded_with_a_warning(checkpoint, bad):
    name = "model.layers.1.mlp.experts.5.gate_proj.weight"

    def edit(t):
        t[name] = t[name].copy()
        t[name][3, 7] = bad
        t[name][0, 0] = bad
    _rewrite(checkpoint, edit)
    with pytest.raises(CheckpointError, match=rf"non-finite values \(NaN or Inf\) in model\.safetensors: "
                                              rf"{name.replace('.', '[.]')} \(2 of \d+ values\).*allow_nonfinite=True"):
        load_checkpoint(checkpoint, progress=False)
    with pytest.warns(UserWarning, match=rf"{name.replace('.', '[.]')}.*loaded: allow_nonfinite"):
        model = load_checkpoint(checkpoint, progress=False, allow_nonfinite=True)
    assert not np.isfinite(np.asarray(model.layers[1].moe.w_gate_EDF[...][5])).all()


def test_loading_unchanged_checkpoints_still_matches_saving(checkpoint, tmp_path):
    # The checks change nothing for a good checkpoint: load -> save -> load gives the same tensors.
    from epsjax.checkpoint import save_checkpoint
    model = load_checkpoint(checkpoint, progress=False)
    again = load_checkpoint(save_checkpoint(model, tmp_path / "again"), progress=False)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


# config.json fields ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    ({"hidden_size": _DELETE}, r"field hidden_size is missing"),
    ({"hidden_size": "64"}, r"field hidden_size must be an integer >= 1, got '64'"),
    ({"hidden_size": 64.0}, r"field hidden_size must be an integer >= 1, got 64\.0"),
    ({"num_hidden_layers": True}, r"field num_hidden_layers must be an integer >= 1, got True"),
    ({"rms_norm_eps": -1}, r"field rms_norm_eps must be a finite number > 0, got -1"),
    ({"rms_norm_eps": 0}, r"field rms_norm_eps must be a finite number > 0, got 0"),
    ({"num_experts_per_tok": 0}, r"field num_experts_per_tok must be an integer >= 1, got 0"),
    ({"num_experts_per_tok": 99}, r"router\.top_k=99 must be in \[1, num_experts=8\]"),
    ({"pad_token_id": 160}, r"pad_token_id=160 is not a token id of the vocabulary \[0, 160\)"),
    ({"eos_token_id": 5000}, r"eos_token_id=5000 is not a token id of the vocabulary \[0, 160\)"),
    ({"eos_token_id": -3}, r"field eos_token_id must be a token id"),
    ({"num_key_value_heads": 3}, r"num_heads=4 is not a multiple of num_kv_heads=3"),
    ({"model_type": "gpt2"}, r"field model_type='gpt2' is not supported; supported: mixtral"),
    ({"model_type": _DELETE}, r"field model_type is missing"),
    ({"use_sliding_window": True}, r"field use_sliding_window: true \(sliding-window attention\) is not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, r"rope_parameters\.rope_type must be one of"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -5}}, r"rope_theta must be a finite number > 0"),
    ({"mlp_only_layers": [0, 1]}, r"every one of the 2 layers is dense"),
    ({"torch_dtype": "int8"}, r"dtype 'int8' .* must be one of bfloat16, float16, float32"),
], ids=lambda x: str(x)[:40])
def test_config_fields_are_checked(checkpoint, changes, message):
    _edit_config(checkpoint, **changes)
    with pytest.raises(ConfigError, match=r"config\.json: .*" + message):
        load_checkpoint(checkpoint, progress=False)


@pytest.mark.parametrize("changes,message", [
    ({"moe_layer_freq": 0}, r"field moe_layer_freq must be an integer >= 1, got 0"),
    ({"topk_group": 0}, r"field topk_group must be an integer >= 1, got 0"),
    ({"topk_group": 5}, r"router\.topk_group=5 must be in \[1, n_group=4\]"),
    ({"n_group": 3}, r"num_experts=8 is not divisible by router\.n_group=3"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"field rope_parameters\.original_max_position_embeddings is missing"),
    ({"qk_rope_head_dim": 7}, r"mla\.qk_rope_head_dim=7 must be even"),
    ({"topk_method": "noaux_tc"}, r"field topk_method must be one of greedy, group_limited_greedy"),
], ids=lambda x: str(x)[:40])
def test_deepseek_config_fields_are_checked(tmp_path, changes, message):
    path = copy_fixture(tmp_path, "deepseek_v2_lora")
    _edit_config(path, **changes)
    with pytest.raises(ConfigError, match=r"config\.json: .*" + message):
        read_config(path)


def test_config_that_is_not_json(checkpoint):
    (checkpoint / "config.json").write_text("{'single': 'quotes'}")
    with pytest.raises(CheckpointError, match=r"config\.json: config\.json is not valid JSON"):
        load_checkpoint(checkpoint, progress=False)


def test_dtype_asked_for_must_be_a_float(checkpoint):
    with pytest.raises(ConfigError, match=r"dtype 'int8' .* must be one of bfloat16, float16, float32"):
        load_checkpoint(checkpoint, dtype="int8", progress=False)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path, progress=False)


def test_unknown_preset():
    with pytest.raises(ConfigError, match=r"unknown preset 'mixtral-8x8b'; known presets: .*mixtral-8x7b"):
        get_preset("mixtral-8x8b")


# Requests ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine():
    return Engine(MoETransformer(get_preset("tiny-qwen3-moe", max_seq_len=32), rngs=nnx.Rngs(0)))


def test_out_of_range_token_ids(engine):
    with pytest.raises(RequestError, match=r"prompt 0 has token ids outside the vocabulary \[0, 256\): \[256\]"):
        engine.generate([[1, 2, 256], [-1, 3]])
    with pytest.raises(RequestError, match=r"prompt 1 has token ids outside the vocabulary \[0, 256\): \[-1\]"):
        engine.generate([[1, 2], [-1, 3]])
    with pytest.raises(RequestError, match=r"outside the vocabulary \[0, 256\): \[1180591620717411303424\]"):
        engine.generate([[1, 2**70]])
    with pytest.raises(RequestError, match=r"outside the vocabulary"):
        engine.prefill(np.array([[1, 999]]))


@pytest.mark.parametrize("prompt,shown", [([1.5, 2], r"1\.5 \(float\)"), ([True, 2], r"True \(bool\)"),
                                          (["7", 2], r"'7' \(str\)"), ([1, None], r"None")])
def test_token_ids_must_be_integers(engine, prompt, shown):
    with pytest.raises(RequestError, match=r"prompt 0: token ids must be integers, got " + shown):
        engine.generate([prompt])


def test_prefill_tokens_and_mask_types(engine):
    with pytest.raises(RequestError, match=r"tokens: token ids must be integers"):
        engine.prefill(np.ones((1, 4), np.float32))
    with pytest.raises(RequestError, match=r"attention mask must be boolean \(or 0/1 integers\), got float"):
        engine.prefill(np.ones((1, 4), np.int32), np.full((1, 4), 0.5))
    with pytest.raises(RequestError, match=r"sequences \[1\] have no real token in the mask"):
        engine.prefill(np.ones((2, 4), np.int32), np.array([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(RequestError, match=r"cache_len must be a positive integer, got 0"):
        engine.prefill(np.ones((1, 4), np.int32), cache_len=0)


def test_empty_batch_and_empty_prompt(engine):
    with pytest.raises(RequestError, match="empty batch"):
        engine.generate([])
    with pytest.raises(RequestError, match=r"prompts \[1\] are empty"):
        engine.generate([[1, 2], []])
    with pytest.raises(RequestError, match="non-empty"):
        engine.prefill(np.zeros((0, 4), np.int32))
    with pytest.raises(RequestError, match=r"prompts must be a list of token-id sequences, got str"):
        engine.generate("hello")
    with pytest.raises(RequestError, match=r"prompt 0 must be a sequence of token ids, got int"):
        engine.generate([5])


def test_lengths_are_checked_on_real_not_padded_prompts(engine):
    # max_seq_len 32: a 27-token prompt pads to 32, yet 27 + 5 new tokens fit exactly.
    result = engine.generate([[3] * 27], max_new_tokens=5, stop_at_eos=False)
    assert len(result.tokens[0]) == 5
    assert len(engine.generate([[3] * 31], max_new_tokens=1).tokens[0]) == 1
    with pytest.raises(RequestError, match=r"prompt length 27 plus max_new_tokens 6 exceeds the model's maximum "
                                           r"sequence length 32"):
        engine.generate([[3] * 27], max_new_tokens=6)
    with pytest.raises(RequestError, match=r"prompt length 40 exceeds the cache length 32"):
        engine.prefill(np.ones((1, 40), np.int32))


def test_generation_budget_and_sampling_type(engine):
    for bad in (0, -3, 1.5, True):
        with pytest.raises(RequestError, match=r"max_new_tokens must be an integer >= 1"):
            engine.generate([[1, 2]], max_new_tokens=bad)
    with pytest.raises(RequestError, match=r"sampling must be a SamplingParams, got dict"):
        engine.generate([[1, 2]], sampling={"temperature": 1.0})


def test_full_cache_is_an_error_not_an_overwrite(engine):
    _, state, _ = engine.prefill(np.ones((1, 8), np.int32), cache_len=9)
    _, state, _ = engine.decode_step(state, [3])
    with pytest.raises(RequestError, match=r"KV cache is full \(9 slots\)"):
        engine.decode_step(state, [3])


def test_decode_step_batch_must_match_its_state(engine):
    _, state, _ = engine.prefill(np.ones((2, 8), np.int32), cache_len=16)
    with pytest.raises(RequestError, match=r"one token per sequence of the state's batch \(2\), got shape \(3,\)"):
        engine.decode_step(state, [3, 4, 5])
    with pytest.raises(RequestError, match=r"state must be the DecodeState"):
        engine.decode_step({"cache": None}, [3, 4])


@pytest.mark.parametrize("kwargs,message", [
    ({"temperature": math.nan}, "temperature must be a finite number >= 0, got nan"),
    ({"temperature": math.inf}, "temperature must be a finite number >= 0, got inf"),
    ({"temperature": -1}, "temperature must be a finite number >= 0, got -1"),
    ({"temperature": "0.5"}, "temperature must be a finite number >= 0, got '0.5'"),
    ({"top_p": math.nan}, r"top_p must be a number in \(0, 1\], got nan"),
    ({"top_p": 0}, r"top_p must be a number in \(0, 1\], got 0"),
    ({"top_p": 1.5}, r"top_p must be a number in \(0, 1\], got 1.5"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
    ({"seed": 2**32}, r"seed must be an integer in \[0, 2\*\*32\) \(jax's PRNG takes 32-bit seeds\), got 4294967296"),
    ({"seed": 1.0}, r"seed must be an integer"),
], ids=lambda x: str(x)[:30])
def test_bad_sampling_parameters(kwargs, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


# Plans, meshes, kernels --------------------------------------------------------------------------------------------


def test_plan_and_mesh_errors():
    with pytest.raises(sharding.PlanError, match=r"needs 16 devices, but only 8 cpu device\(s\)"):
        sharding.make_mesh(data=2, expert=8)
    with pytest.raises(sharding.PlanError, match=r"unknown rule set 'ep'"):
        sharding.get_rules("ep")
    with pytest.raises(sharding.PlanError, match=r"num_experts=6 is fewer than the expert-parallel size 8"):
        sharding.rules_for_model(get_preset("tiny-mixtral", num_experts=6), sharding.make_mesh(expert=8), "dp_ep")
    with pytest.raises(sharding.PlanError, match=r"pipeline_degree must be a positive int"):
        sharding.ExpertPlan(pipeline_degree=0)


def test_kernel_errors():
    lhs, rhs = np.ones((4, 8), np.float32), np.ones((2, 8, 8), np.float32)
    with pytest.raises(pk.KernelError, match=r"unknown backend backend='fast'"):
        pk.group_gemm(lhs, rhs, np.array([2, 2], np.int32), backend="fast")
    with pytest.raises(pk.KernelError, match=r"backend 'mosaic_gpu' needs a CUDA GPU"):
        pk.group_gemm(lhs, rhs, np.array([2, 2], np.int32), backend="mosaic_gpu")


def test_no_warning_loading_a_good_checkpoint(checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_checkpoint(checkpoint, progress=False)
