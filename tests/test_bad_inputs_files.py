"""Bad input, round two (issue 31): config.json sizes the checkpoint does not hold, every other file the command
and the loader read, the memory check before loading, and --force. Each case is one line on stderr and exit status 2
from the command (or its typed error from Python), within seconds; each test is bounded in time."""

import dataclasses
import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import jax
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from epsjax.checkpoint import CheckpointError, check_checkpoint, load_checkpoint, read_config
from epsjax.cli import main
from epsjax.deployment import DeploymentSpec, RequestShape, SpecError, build, memory
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


# 2. Every file the command and the loader read --------------------------------------------------------------------


CONFIG_DAMAGE = {
    "empty": (lambda f: f.write_text(""), r"config\.json is not valid JSON"),
    "binary": (lambda f: f.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), r"config\.json is not valid JSON"),
    "a list": (lambda f: f.write_text("[1, 2]"), r"config\.json: must hold a JSON object, got list"),
    "a string": (lambda f: f.write_text('"mixtral"'), r"must hold a JSON object, got str"),
    "truncated": (lambda f: f.write_text(f.read_text()[:40]), r"config\.json is not valid JSON"),
    "a directory": (lambda f: (f.unlink(), f.mkdir()), r"config\.json: config\.json is not a regular file"),
    "a broken link": (lambda f: (f.unlink(), f.symlink_to(f.parent / "nowhere.json")), r"broken symbolic link"),
    "model_type a number": (lambda f: f.write_text(json.dumps({**json.loads(f.read_text()), "model_type": 3})),
                            r"field model_type is missing or not a string \(got 3\)"),
}


@pytest.mark.parametrize("damage", list(CONFIG_DAMAGE))
def test_damaged_config_json(capsys, tmp_path, damage):
    path = copy_fixture(tmp_path)
    edit, message = CONFIG_DAMAGE[damage]
    edit(path / "config.json")
    for command in ("generate", "info"):
        line = error_line(capsys, command, "--model", str(path), "--prompt", "1,2") if command == "generate" else \
            error_line(capsys, command, "--model", str(path))
        assert str(path / "config.json") in line
        assert re.search(message, line), line


TOKENIZER_DAMAGE = {
    "empty": lambda f: f.write_text(""),
    "not JSON": lambda f: f.write_text("tokenizer: yes"),
    "truncated": lambda f: f.write_text(f.read_text()[: len(f.read_text()) // 2]),
    "JSON of another shape": lambda f: f.write_text(json.dumps({"model": 3, "version": "1.0"})),
    "binary": lambda f: f.write_bytes(bytes(range(256))),
}


@pytest.mark.parametrize("damage", list(TOKENIZER_DAMAGE))
def test_damaged_tokenizer_json_exits_2_naming_it(capsys, tmp_path, damage):
    path = copy_fixture(tmp_path, "mixtral")
    TOKENIZER_DAMAGE[damage](path / "tokenizer.json")
    start = time.perf_counter()
    line = error_line(capsys, "generate", "--model", str(path), "--text", "hello world", "--max-new-tokens", "2")
    assert f"{path / 'tokenizer.json'}: tokenizer.json cannot be loaded by the tokenizers library (" in line
    assert time.perf_counter() - start < 20


@pytest.mark.parametrize("damage,message", [
    (lambda f: (f.unlink(), f.mkdir()), "tokenizer.json is not a regular file"),
    (lambda f: (f.unlink(), f.symlink_to(f.parent / "gone.json")), "tokenizer.json is a broken symbolic link"),
])
def test_tokenizer_json_that_is_not_a_file(capsys, tmp_path, damage, message):
    path = copy_fixture(tmp_path, "mixtral")
    damage(path / "tokenizer.json")
    assert message in error_line(capsys, "generate", "--model", str(path), "--prompt", "1,2")


def test_unread_files_do_not_matter(capsys, tmp_path):
    """generation_config.json and tokenizer_config.json are not read (the flags and config.json decide): damaged,
    they change nothing."""
    path = copy_fixture(tmp_path, "mixtral")
    (path / "generation_config.json").write_text("{not json")
    (path / "tokenizer_config.json").write_bytes(b"\xff\xfe\x00")
    assert main(["generate", "--model", str(path), "--text", "hello world", "--max-new-tokens", "2",
                 "--no-token-healing"]) == 0
    assert "output[0]" in capsys.readouterr().out


@pytest.mark.parametrize("damage,message", [
    (lambda index, table: index.write_text("{not json"), r"index\.json: the shard index is not valid JSON"),
    (lambda index, table: index.write_text("[]"), r"index\.json: no weight_map object"),
    (lambda index, table: index.write_text(json.dumps({"weight_map": list(table["weight_map"])})),
     r"index\.json: no weight_map object"),
    (lambda index, table: index.write_text(json.dumps({"weight_map": {**table["weight_map"], "lm_head.weight": 7}})),
     r"index\.json: no weight_map object"),
    (lambda index, table: (index.parent / "model-00002-of-00005.safetensors").unlink(),
     r"shard files that do not exist: .*model-00002-of-00005\.safetensors"),
    (lambda index, table: ((index.parent / "model-00002-of-00005.safetensors").unlink(),
                           (index.parent / "model-00002-of-00005.safetensors").mkdir()),
     r"model-00002-of-00005\.safetensors: a shard is not a regular file"),
    (lambda index, table: (index.parent / "model-00003-of-00005.safetensors").write_bytes(b"\x08" + b"\0" * 7),
     r"model-00003-of-00005\.safetensors: truncated or not a safetensors file"),
])
def test_damaged_shard_index(capsys, tmp_path, damage, message):
    path = copy_fixture(tmp_path, "mixtral")
    index = path / "model.safetensors.index.json"
    damage(index, json.loads(index.read_text()))
    line = error_line(capsys, "generate", "--model", str(path), "--prompt", "1,2")
    assert re.search(message, line), line


def _write_calibration(directory, **changes):
    from epsjax.scheduler import calibration
    data = json.loads(calibration.calibration_path("cpu").read_text())
    data.update(changes)
    directory.mkdir(exist_ok=True)
    (directory / "cpu.json").write_text(json.dumps(data))
    return directory / "cpu.json"


@pytest.mark.parametrize("damage,message", [
    (lambda f: f.write_text("{"), r"cpu\.json: the calibration is not valid JSON"),
    (lambda f: f.write_text("[]"), r"cpu\.json: a calibration must be a JSON object, got list"),
    (lambda f: f.write_bytes(b"\xff\xfe"), r"cpu\.json: the calibration is not valid JSON"),
    (lambda f: (f.unlink(), f.mkdir()), r"cpu\.json: cannot read the calibration: Is a directory"),
    (lambda f: _write_calibration(f.parent, memory_gbs="fast"), r"calibration fields of the wrong type: "
                                                                r"memory_gbs='fast'"),
    (lambda f: _write_calibration(f.parent, dense_tflops=[1.0]), r"wrong type: dense_tflops=\[1\.0\]"),
    (lambda f: _write_calibration(f.parent, link_latency_s=-1), r"wrong type: link_latency_s=-1"),
    (lambda f: _write_calibration(f.parent, host_to_device_gbs="x"), r"wrong type: host_to_device_gbs='x'"),
])
def test_damaged_calibration_file(capsys, tmp_path, monkeypatch, damage, message):
    from epsjax.scheduler import calibration
    from epsjax.scheduler.errors import ScheduleError
    file = _write_calibration(tmp_path / "calibrations")
    damage(file)
    with pytest.raises(ScheduleError, match=message):
        calibration.load_calibration("cpu", tmp_path / "calibrations")
    monkeypatch.setattr(calibration, "CALIBRATION_DIR", tmp_path / "calibrations")
    # the plan search on 8 devices reads the CPU's calibration
    line = error_line(capsys, "generate", "--preset", "tiny-mixtral", "--max-new-tokens", "2")
    assert re.search(message, line), line


def test_a_damaged_calibration_beside_others_does_not_stop_matching(tmp_path):
    from epsjax.scheduler import calibration
    from epsjax.scheduler.hardware import get_hardware
    _write_calibration(tmp_path)
    (tmp_path / "broken.json").write_text("[1, 2")
    (tmp_path / "list.json").write_text("[1, 2]")
    assert calibration.calibration_matching(get_hardware("h100"), tmp_path) is None


@pytest.fixture
def cache_config():
    """JAX's compilation cache setting, restored after a test (an unusable directory must leave it untouched)."""
    before = jax.config.jax_compilation_cache_dir
    yield before
    assert jax.config.jax_compilation_cache_dir == before
    jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.parametrize("make,reason", [
    (lambda d: d.write_text("a file"), "it exists and is not a directory"),
    (lambda d: (d.parent / "file").write_text("x") or None, "Not a directory"),
])
def test_unusable_compilation_cache_directory_warns_and_runs_without(capsys, tmp_path, cache_config, make, reason):
    from epsjax.compilation import CompilationCacheWarning, enable_compilation_cache
    directory = tmp_path / "cache"
    make(directory)
    if reason == "Not a directory":
        directory = tmp_path / "file" / "cache"
    with pytest.warns(CompilationCacheWarning, match=rf"{directory}: the compilation cache directory cannot be used "
                                                     rf"\({reason}\); running without"):
        assert enable_compilation_cache(directory) is None
    # the command: a warning line, then the run as usual
    assert main(["generate", "--preset", "tiny-mixtral", "--strategy", "local", "--batch", "1", "--prompt-len", "4",
                 "--max-new-tokens", "2", "--compile-cache", str(directory)]) == 0
    captured = capsys.readouterr()
    assert f"epsjax generate: warning: {directory}: the compilation cache directory cannot be used" in captured.err
    assert "(off)" in captured.out


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_full_or_unwritable_compilation_cache_warns(tmp_path, monkeypatch, cache_config, error):
    # (Tests run as root, where permissions do not stop writes, and no disk here is full: the OS error is injected
    # where a full disk reports it, at the probe's fsync.)
    from epsjax.compilation import CompilationCacheWarning, enable_compilation_cache

    def failing_fsync(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.warns(CompilationCacheWarning, match=rf"\({os.strerror(error)}\); running without"):
        assert enable_compilation_cache(tmp_path / "cache") is None


def _predictor_dir(tmp_path):
    from epsjax.offload.predictor import PredictorConfig, RoutingPredictor, RoutingPredictorModel
    cfg = read_config(FIXTURES / "mixtral")
    predictor = RoutingPredictor(RoutingPredictorModel(PredictorConfig.for_model(cfg, d_model=16, head_dim=8,
                                                                               enc_layers=1, window=8),
                                                       rngs=nnx.Rngs(0)))
    return predictor.save(tmp_path / "predictor")


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "predictor_config.json").write_text("{"), r"predictor_config\.json: the predictor config is not valid JSON"),
    (lambda d: (d / "predictor_config.json").write_text("[]"), r"predictor_config\.json: must be a JSON object"),
    (lambda d: (d / "predictor_config.json").write_text(json.dumps({"vocab_size": 160})),
     r"must be a JSON object with fields vocab_size, num_layers, num_experts, top_k"),
    (lambda d: (d / "predictor_config.json").write_text(json.dumps(
        {**json.loads((d / "predictor_config.json").read_text()), "enc_layers": 10**6})),
     r"declares enc_layers=1000000, but predictor\.safetensors holds 1 encoder blocks"),
    (lambda d: (d / "predictor_config.json").write_text(json.dumps(
        {**json.loads((d / "predictor_config.json").read_text()), "d_model": "16"})),
     r"fields must be positive integers: d_model='16'"),
    (lambda d: (d / "predictor_config.json").write_text(json.dumps(
        {**json.loads((d / "predictor_config.json").read_text()), "d_model": 32})),
     r"predictor\.safetensors: predictor tensors do not match predictor_config\.json"),
    (lambda d: (d / "predictor.safetensors").write_bytes(b"\x05" + b"\0" * 3),
     r"predictor\.safetensors: cannot be read as safetensors"),
])
def test_damaged_predictor(capsys, tmp_path, damage, message):
    from epsjax.offload.errors import OffloadError
    from epsjax.offload.predictor import RoutingPredictor
    directory = _predictor_dir(tmp_path)
    damage(directory)
    with pytest.raises(OffloadError, match=message):
        RoutingPredictor.load(directory)
    line = error_line(capsys, "generate", "--model", str(FIXTURES / "mixtral"), "--prompt", "1,2",
                      "--max-new-tokens", "2", "--offload", "expertflow", "--offload-budget", "0.5", "--predictor",
                      str(directory))
    assert re.search(message, line), line


# 3. The memory check before loading --------------------------------------------------------------------------------


def test_a_preset_larger_than_the_host_is_refused_with_the_numbers(capsys):
    start = time.perf_counter()
    line = error_line(capsys, "generate", "--preset", "deepseek-v2", "--strategy", "local", "--max-new-tokens", "2")
    assert time.perf_counter() - start < 20
    assert re.search(r"preset deepseek-v2 with --strategy local needs [\d.]+ GiB per device \("
                                   r"parameters [\d.]+ GiB in bfloat16 \+ KV cache [\d.]+ [MG]iB for 8 x 64 tokens\), "
                                   r"and the host has [\d.]+ GiB \(80% usable\), shared by its 8 CPU device\(s\)",
                                   line), line
    assert "(a tiny-* preset would); or --force to load anyway" in line


def test_the_check_runs_on_a_mesh_and_for_dep(monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 2**17)  # a 128 KiB host
    for spec, request in [(DeploymentSpec(preset="tiny-mixtral"), RequestShape(8, 8, 2)),
                          (DeploymentSpec(preset="tiny-mixtral", strategy="dep", dep_split=(4, 4)),
                           RequestShape(4, 8, 2)),
                          (DeploymentSpec(preset="tiny-mixtral", offload="lru", offload_budget=0.5),
                           RequestShape(2, 8, 2)),
                          (DeploymentSpec(model=str(FIXTURES / "mixtral"), quantize="fp8", strategy="local"),
                           RequestShape(2, 8, 2))]:
        strategy = {"dep": "dep", "local": "local"}.get(spec.strategy, "dp_ep" if spec.offload is None else "local")
        with pytest.raises(SpecError, match=rf"with --strategy {strategy} needs [\d.]+ MiB per device .* or --force "
                                            r"to load anyway") as error:
            build(spec, request, progress=False)
        assert "\n" not in str(error.value)
        built = build(dataclasses.replace(spec, force=True), request, progress=False)
        assert "memory" in [name for name, _ in built.steps]


def test_force_loads_anyway_from_the_command(capsys, monkeypatch):
    monkeypatch.setattr(memory, "host_memory_bytes", lambda: 2**17)
    argv = ["generate", "--model", str(FIXTURES / "mixtral"), "--prompt", "1,2", "--max-new-tokens", "2"]
    line = error_line(capsys, *argv)
    assert "mixtral with --strategy local needs" in line and "MiB per device" in line
    assert main([*argv, "--force"]) == 0


def _case(request=RequestShape(1, 8, 8), strategy="local", **spec):
    cfg = read_config(FIXTURES / "mixtral")  # float32: --dtype bfloat16 is an option
    return memory.Case(DeploymentSpec(model=str(FIXTURES / "mixtral"), **spec), cfg, request, strategy)


def _apply(case, option):
    """The case with one suggested option applied (more devices are checked by their own arithmetic)."""
    spec, words = case.spec, option.split()
    if words[0] == "--dtype":
        return case.but(spec=dataclasses.replace(spec, dtype="bfloat16"), cfg=case.cfg.replace(dtype="bfloat16"))
    if words[0] == "--quantize":
        return case.but(spec=dataclasses.replace(spec, quantize="fp8"))
    if words[0] == "--offload":
        return case.but(spec=dataclasses.replace(spec, offload=words[1], offload_budget=float(words[3])))
    if words[0] == "--max-new-tokens":
        return case.but(request=dataclasses.replace(case.request, max_new_tokens=int(words[1])))
    assert option.startswith("--strategy dp_ep on "), option
    return None


def _offered(case, share):
    """The options offered to a GPU-like device (its own memory, the host's apart) with `share` of what the case
    needs; each, applied, must pass the same check."""
    needed = case.need()
    have = memory.Available(device=int(share * needed.device / memory.DEVICE_SHARE), host=64 * 2**30, count=1,
                            kind="NVIDIA H100 80GB HBM3")
    with pytest.raises(SpecError) as error:
        memory.check(case, None, have=have)
    message = str(error.value)
    assert "\n" not in message and "each NVIDIA H100 80GB HBM3 has" in message, message
    if "would fit: " not in message:
        assert "none of --dtype bfloat16, --quantize fp8, --offload, a shorter cache or more devices" in message
        return []
    offered = message.split("would fit: ")[1].split("; or --force")[0].split("; ")
    for option in offered:
        applied = _apply(case, option)
        if applied is not None:
            assert memory.check(applied, None, have=have), option
    return offered


@pytest.mark.parametrize("share", [0.2, 0.45, 0.6, 0.9])
def test_every_option_offered_fits(share):
    offered = _offered(_case(), share)
    if share >= 0.6:  # the parameters dominate this small request: dtype, FP8, offloading, more devices
        assert "--dtype bfloat16" in offered and "--quantize fp8" in offered, offered
        assert any(o.startswith("--offload lru --offload-budget ") for o in offered), offered
        assert any(o.startswith("--strategy dp_ep on ") for o in offered), offered


def test_a_long_request_is_offered_a_shorter_cache():
    case = _case(RequestShape(8, 32, 480))  # the KV cache (8 x 512 slots) dominates
    needed = case.need()
    share = (needed.params + 0.3 * needed.kv_cache) / needed.device  # the parameters fit, the whole cache does not
    offered = _offered(case, share)
    assert any(re.fullmatch(r"--max-new-tokens \d+ \(a KV cache of 8 x \d+ tokens\)", o) for o in offered), offered


def test_a_fitting_request_passes_and_records_its_numbers():
    case = _case(RequestShape(8, 32, 480))
    needed = memory.check(case, None, have=memory.Available(device=None, host=64 * 2**30, count=8, kind="cpu"))
    assert needed.params > 0 and needed.kv_cache == memory.kv_cache_bytes(case.cfg, 8, 512)
    assert needed.cache == (8, 512)  # 32-token prompts + 480 new: the bucketed cache
