"""Bad input, round two (issue 31): config.json sizes the checkpoint does not hold. Each case is one line on stderr
and exit status 2 from the command (or its typed error from Python), within seconds; each test is bounded in time."""

import json
import shutil
import time
from pathlib import Path

import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from epsjax.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, read_config
from epsjax.cli import main
from epsjax.models import ConfigError

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
pytestmark = pytest.mark.timeout(120)


def copy_fixture(tmp_path, name="qwen3_moe"):
    """A writable copy of a real (transformers-made) checkpoint, to damage."""
    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    (path / "expected.safetensors").unlink(missing_ok=True)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        section, _, field = key.rpartition("__")  # ffn_config__moe_num_experts -> config["ffn_config"][...]
        (config[section] if section else config)[field] = value
    (path / "config.json").write_text(json.dumps(config))


def error_line(capsys, *argv) -> str:
    """Runs the command expecting an input error: exit status 2 and one error line last on stderr (after a loading
    bar or a warning, if any), no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("epsjax ") and ": error: " in line]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.fixture
def no_abstract_model(monkeypatch):
    """The test must fail before any abstract (or real) model is built for the config."""
    def refuse(*args, **kwargs):
        raise AssertionError("nnx.eval_shape reached for a config the checkpoint does not hold")
    monkeypatch.setattr(nnx, "eval_shape", refuse)


# 1. config.json sizes against the tensors (headers only) -----------------------------------------------------------


@pytest.mark.usefixtures("no_abstract_model")
@pytest.mark.parametrize("fixture,changes,message", [
    ("qwen3_moe", {"num_hidden_layers": 4000},
     r"declares num_hidden_layers=4000, but the checkpoint holds tensors for layers 0-1 \(2 layers\)"),
    ("mixtral", {"num_hidden_layers": 1},  # a layer beyond the declared count is an error too
     r"declares num_hidden_layers=1, but the checkpoint holds tensors for layers 0-1 \(2 layers\)"),
    ("qwen3_moe", {"hidden_size": 10**7},
     r"declares hidden_size=10000000, but the checkpoint holds hidden_size=64 \(model\.embed_tokens\.weight has "
     r"shape \(160, 64\); 6 more agree\)"),
    ("qwen3_moe", {"vocab_size": 10**6}, r"declares vocab_size=1000000, but the checkpoint holds vocab_size=160"),
    ("qwen3_moe", {"num_local_experts": 100000},
     r"declares num_experts \(or num_local_experts\)=100000, but the checkpoint holds tensors for experts 0-7 "
     r"\(8 experts\)"),
    ("qwen3_moe", {"num_local_experts": 4},
     r"declares num_experts \(or num_local_experts\)=4, but the checkpoint holds num_experts \(or "
     r"num_local_experts\)=8 \(model\.layers\.1\.mlp\.gate\.weight has shape \(8, 64\)\)"),
    ("qwen3_moe", {"moe_intermediate_size": 10**6},
     r"declares moe_intermediate_size=1000000, but the checkpoint holds moe_intermediate_size=32"),
    ("qwen3_moe", {"intermediate_size": 10**6},
     r"declares intermediate_size=1000000, but the checkpoint holds intermediate_size=64"),
    ("qwen3_moe", {"head_dim": 10**5}, r"declares head_dim=100000, but the checkpoint holds head_dim=24"),
    ("qwen3_moe", {"num_attention_heads": 8},
     r"declares num_attention_heads=8 \(x head_dim 24 rows of q_proj\), but the checkpoint holds "
     r"num_attention_heads=4"),
    ("qwen3_moe", {"num_key_value_heads": 4}, r"declares num_key_value_heads=4 .* holds num_key_value_heads=2"),
    ("qwen3_moe", {"mlp_only_layers": []},
     r"declares routed experts in layers 0-1 and dense layers none \(its mlp_only_layers / decoder_sparse_step\), "
     r"but the checkpoint holds routed experts in layers 1"),
    ("mixtral", {"num_hidden_layers": 100000},
     r"declares num_hidden_layers=100000, but the checkpoint holds tensors for layers 0-1 \(2 layers\)"),
    ("mixtral", {"num_local_experts": 10**6}, r"declares num_local_experts=1000000, but the checkpoint holds "
                                              r"tensors for experts 0-7 \(8 experts\)"),
    ("mixtral", {"intermediate_size": 48}, r"declares intermediate_size=48, but the checkpoint holds "
                                           r"intermediate_size=32"),
    ("deepseek_v2_lora", {"num_hidden_layers": 10**9}, r"declares num_hidden_layers=1000000000, but the checkpoint "
                                                       r"holds tensors for layers 0-1 \(2 layers\)"),
    ("deepseek_v2_lora", {"n_routed_experts": 16, "n_group": 4},
     r"declares n_routed_experts=16, but the checkpoint holds tensors for experts 0-7 \(8 experts\)"),
    ("deepseek_v2_lora", {"kv_lora_rank": 64}, r"declares kv_lora_rank=64, but the checkpoint holds kv_lora_rank=32"),
    ("deepseek_v2_lora", {"q_lora_rank": 4096}, r"declares q_lora_rank=4096, but the checkpoint holds q_lora_rank=24"),
    ("deepseek_v2_lora", {"n_shared_experts": 7}, r"declares n_shared_experts=7 .* holds n_shared_experts=2"),
    ("deepseek_v2_lora", {"first_k_dense_replace": 0},
     r"declares routed experts in layers 0-1 and dense layers none \(its first_k_dense_replace / moe_layer_freq\)"),
    ("dbrx", {"n_layers": 100000}, r"declares n_layers=100000, but the checkpoint holds tensors for layers 0-1"),
    ("dbrx", {"d_model": 128}, r"declares d_model=128, but the checkpoint holds d_model=64"),
    ("dbrx", {"ffn_config__moe_num_experts": 16},
     r"declares ffn_config\.moe_num_experts=16, but the checkpoint holds ffn_config\.moe_num_experts=8"),
    ("dbrx", {"ffn_config__ffn_hidden_size": 10**6},
     r"declares ffn_config\.ffn_hidden_size=1000000 \(x moe_num_experts 8 rows of the fused experts\), but the "
     r"checkpoint holds ffn_config\.ffn_hidden_size=32"),
], ids=lambda x: str(x)[:48])
def test_config_sizes_the_files_do_not_hold_are_refused_from_the_headers(tmp_path, fixture, changes, message):
    path = copy_fixture(tmp_path, fixture)
    edit_config(path, **changes)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"config\.json " + message):
        load_checkpoint(path, progress=False)
    with pytest.raises(ConfigError, match=message):
        check_checkpoint(path)
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("changes", [{"num_hidden_layers": 100000}, {"hidden_size": 10**7},
                                     {"num_local_experts": 10**7}])
def test_a_huge_declared_size_fails_from_the_command_within_seconds(capsys, tmp_path, changes):
    path = copy_fixture(tmp_path, "mixtral")
    edit_config(path, **changes)
    start = time.perf_counter()
    line = error_line(capsys, "generate", "--model", str(path), "--prompt", "1,2", "--max-new-tokens", "2")
    elapsed = time.perf_counter() - start
    field, value = next(iter(changes.items()))
    assert f"{path / 'config.json'} declares {field}={value}, but the checkpoint holds" in line
    assert elapsed < 20, f"{elapsed:.1f} s"  # generous: the machine is shared; it takes well under a second


@pytest.mark.usefixtures("no_abstract_model")
def test_a_missing_layer_is_named(tmp_path):
    path = copy_fixture(tmp_path)
    tensors = {k: v for k, v in load_file(str(path / "model.safetensors")).items() if ".layers.0." not in k}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"declares num_hidden_layers=2, but the checkpoint holds tensors for "
                                          r"layers 1 \(1 layer\); none for layers 0"):
        load_checkpoint(path, progress=False)


@pytest.mark.usefixtures("no_abstract_model")
def test_one_damaged_tensor_is_a_tensor_error_not_a_config_one(tmp_path):
    """Layer 1's q_proj lost rows, layer 0's agrees with config.json: the tensors that show num_attention_heads
    disagree among themselves, so the tensor is named (CheckpointError), not the field."""
    path = copy_fixture(tmp_path, "mixtral")
    name = "model.layers.1.self_attn.q_proj.weight"
    shard = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(path / shard))
    tensors[name] = tensors[name][:-16]
    save_file(tensors, str(path / shard))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.q_proj\.weight has shape \(48, 64\), "
                                              r"expected \(64, 64\) from config\.json"):
        check_checkpoint(path)


def test_good_checkpoints_pass_the_size_check():
    for name in ("qwen3_moe", "mixtral", "deepseek_v2_lora", "deepseek_v2_nolora", "dbrx"):
        cfg, files, rules = check_checkpoint(FIXTURES / name)
        assert cfg == read_config(FIXTURES / name) and len(files) == sum(len(r.hf_names) for r in rules)
