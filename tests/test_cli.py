"""The `epsjax` command line: text prompts through tokenizer.json, info, errors, and the README's demo run."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from epsjax.cli import main

MIXTRAL = Path(__file__).parent / "fixtures" / "hf" / "mixtral"


def test_generate_from_text_matches_transformers(capsys):
    meta = json.loads((MIXTRAL / "meta.json").read_text())
    expected = load_file(str(MIXTRAL / "expected.safetensors"))["text_greedy"][0].tolist()
    assert main(["generate", "--model", str(MIXTRAL), "--dtype", "float32", "--text", meta["text_prompt"],
                 "--max-new-tokens", "6", "--no-token-healing"]) == 0  # the prompt exactly as transformers saw it
    out = capsys.readouterr().out
    assert f"output[0]  {expected}  {meta['text_greedy_decoded']!r}" in out
    assert re.search(r"prefill .* tokens/s", out) and re.search(r"decode .* tokens/s", out)


def test_info_reports_parameters_and_expert_memory(capsys):
    assert main(["info", "--preset", "mixtral-8x7b"]) == 0
    out = capsys.readouterr().out
    total = float(re.search(r"total\s+([\d.]+)B params", out).group(1))
    assert 46.0 < total < 47.5, out  # Mixtral-8x7B has 46.7B parameters
    assert "per MoE layer" in out


def test_errors_are_one_line(capsys):
    assert main(["generate", "--preset", "tiny-mixtral", "--prompt", "1,2,999"]) == 2
    assert "outside the vocabulary [0, 256): [999]" in capsys.readouterr().err
    assert main(["generate", "--preset", "tiny-mixtral", "--text", "hello"]) == 2
    assert "--text needs a model directory with a tokenizer.json" in capsys.readouterr().err


def _error(capsys, *argv) -> str:
    """Runs the command expecting an input error: exit status 2 and one error line on stderr (after a loading
    progress bar, if any), no traceback."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("epsjax ")]
    assert len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in line for line in err), err
    return errors[0]


def _usage_error(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then one error line
        main(list(argv))
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.fixture
def damaged(tmp_path):
    path = tmp_path / "qwen3"
    shutil.copytree(MIXTRAL.parent / "qwen3_moe", path)
    return path


def test_checkpoint_errors_exit_2_naming_the_file(capsys, damaged):
    file = damaged / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:len(data) // 2])
    line = _error(capsys, "generate", "--model", str(damaged), "--prompt", "1,2")
    assert line.startswith("epsjax generate: error: ") and f"{file}: tensor " in line and "truncated" in line
    file.write_bytes(data)
    (damaged / "model.safetensors.index.json").write_text("{}")
    assert "no weight_map object" in _error(capsys, "generate", "--model", str(damaged), "--prompt", "1,2")


def test_nonfinite_weights_exit_2_unless_allowed(capsys, damaged):
    from safetensors.numpy import save_file
    tensors = load_file(str(damaged / "model.safetensors"))
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, :3] = np.nan
    save_file(tensors, str(damaged / "model.safetensors"))
    line = _error(capsys, "generate", "--model", str(damaged), "--prompt", "1,2", "--max-new-tokens", "2")
    assert f"{name} (3 of " in line and "--allow-nonfinite" in line
    assert main(["generate", "--model", str(damaged), "--prompt", "1,2", "--max-new-tokens", "2",
                 "--allow-nonfinite"]) == 0


@pytest.mark.parametrize("edit,message", [
    ({"hidden_size": None}, "field hidden_size is missing"),
    ({"rms_norm_eps": -1}, "field rms_norm_eps must be a finite number > 0, got -1"),
    ({"pad_token_id": 100000}, "pad_token_id=100000 is not a token id of the vocabulary [0, 160)"),
])
def test_config_errors_exit_2_naming_the_field(capsys, damaged, edit, message):
    config = json.loads((damaged / "config.json").read_text())
    config.update(edit)
    if edit.get("hidden_size", 0) is None:
        del config["hidden_size"]
    (damaged / "config.json").write_text(json.dumps(config))
    line = _error(capsys, "info", "--model", str(damaged))
    assert str(damaged / "config.json") in line and message in line


@pytest.mark.parametrize("argv,message", [
    (["--devices", "-1"], "argument --devices: must be an integer >= 1, got '-1'"),
    (["--devices", "0"], "argument --devices: must be an integer >= 1, got '0'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be an integer >= 1, got '0'"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number, got 'nan'"),
    (["--seed", "-4"], "argument --seed: must be an integer >= 0, got '-4'"),
    (["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
])
def test_bad_flags_exit_2(capsys, argv, message):
    assert message in _usage_error(capsys, "generate", *argv)


@pytest.mark.parametrize("argv,message", [
    (["--top-p", "0"], "top_p must be a number in (0, 1], got 0.0"),
    (["--seed", str(2**32)], "seed must be an integer in [0, 2**32)"),
    (["--prompt", "1.5,2"], "--prompt takes token ids (e.g. '1,2,3'), got '1.5,2'"),
    (["--backend", "fastest"], "--backend must be auto or one of"),
    (["--backend", "mosaic_gpu", "--strategy", "local"], "backend 'mosaic_gpu' needs a CUDA GPU"),
    (["--preset", "mixtral-8x8b"], "unknown preset 'mixtral-8x8b'"),
    (["--strategy", "dp_ep", "--mesh", "1,1,16"], "needs 16 devices, but only 8 cpu device(s)"),
    (["--strategy", "dp_ep", "--mesh", "1,x,1"], "--mesh takes three positive data,tensor,expert sizes"),
    (["--strategy", "dp_ep", "--mesh", "1,1,8", "--quantize", "fp8"], "--quantize fp8 runs on one device for now"),
])
def test_bad_requests_exit_2(capsys, argv, message):
    assert message in _error(capsys, "generate", "--max-new-tokens", "2", *argv)


def test_ragged_transport_on_cpu_exits_2():
    # --devices needs a fresh process (jax reads the device count once).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "epsjax.cli", "generate", "--devices", "4", "--transport",
                             "ragged", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "transport 'ragged' (jax.lax.ragged_all_to_all) needs GPU devices" in lines[0]


def test_debug_shows_the_traceback():
    from epsjax.generation import RequestError
    with pytest.raises(RequestError, match="top_p"):
        main(["generate", "--top-p", "0", "--debug", "--max-new-tokens", "2"])


def _run_cli(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "epsjax.cli", *args], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _outputs(stdout: str) -> list[str]:
    return re.findall(r"^output\[\d\]  (\[.*\])$", stdout, re.MULTILINE)


def test_demo_on_eight_virtual_devices():
    """The README's first command ends with this run: it must report the plan, throughput and token ids, and
    generate what one device generates."""
    demo = _run_cli("generate", "--devices", "8", "--max-new-tokens", "4")
    assert "devices    8 x cpu" in demo
    assert re.search(r"plan       dp_ep on mesh data=1 tensor=1 expert=8; pipeline degree 1.*\(scheduler: ", demo)
    assert len(_outputs(demo)) == 8
    local = _run_cli("generate", "--strategy", "local", "--max-new-tokens", "4")
    assert _outputs(local) == _outputs(demo)
    forced = _run_cli("generate", "--devices", "8", "--strategy", "tp_ep", "--pipeline-degree", "2", "--split",
                      "tokens", "--max-new-tokens", "4")
    assert "pipeline degree 2 split by tokens" in forced and "(forced)" in forced
    assert _outputs(forced) == _outputs(demo)


def test_generate_with_experts_that_do_not_divide_the_ep_size(tmp_path):
    """A checkpoint with 6 experts on 4 expert-parallel devices (2, 1, 2, 1 experts each, in 2 slots) generates
    what one device generates."""
    from flax import nnx

    from epsjax.checkpoint import save_checkpoint
    from epsjax.models import MoETransformer, get_preset

    save_checkpoint(MoETransformer(get_preset("tiny-mixtral", num_experts=6), rngs=nnx.Rngs(3)), tmp_path / "m")
    common = ("generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--batch", "4", "--prompt-len", "8")
    placed = _run_cli(*common, "--devices", "4", "--strategy", "dp_ep", "--mesh", "1,1,4")
    assert "experts    6 over 4 devices in 2 slots each: 1,2,1,2 per device" in placed
    assert _outputs(placed) == _outputs(_run_cli(*common, "--strategy", "local"))


def test_generate_with_fp8_experts(capsys):
    assert main(["generate", "--preset", "tiny-mixtral", "--strategy", "local", "--quantize", "fp8",
                 "--max-new-tokens", "3", "--batch", "2", "--prompt-len", "6"]) == 0
    out = capsys.readouterr().out
    assert "routed experts FP8 W8A8" in out and len(_outputs(out)) == 2


def test_generate_on_disaggregated_groups(capsys):
    """--strategy dep --split 3,5: the FinDEP solver's plan for the batch is printed (from the CPU's calibrated cost
    model) and run (one new token, the prefill's: decoding and that DEP generates one device's tokens are
    tests/dep/test_decode.py's checks)."""
    assert main(["generate", "--preset", "tiny-qwen3-moe", "--max-new-tokens", "1", "--batch", "3", "--prompt-len",
                 "4", "--strategy", "dep", "--split", "3,5", "--schedule", "findep"]) == 0
    out = capsys.readouterr().out
    assert "plan       dep: attention group [0, 1, 2] (data parallel), expert group [3, 4, 5, 6, 7]" in out
    assert re.search(r"schedule   findep\(r1=1, r2=\d, (AASS|ASAS)(, A2E segmented)?\), picked by the FinDEP solver "
                     r"from the findep space for 3 prompts of 4 tokens \(findep: ma=1 r1=1 r2=\d .*predicted prefill "
                     r"step [\d.]+ ms by the cost model \(cpu, calibrated\)", out), out
    outputs = _outputs(out)
    assert len(outputs) == 3 and all(len(json.loads(o)) == 1 for o in outputs)


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "dep", "--split", "3,x"], "--split with --strategy dep takes two positive attention,expert group "
                                              "sizes such as 3,5, got '3,x'"),
    (["--strategy", "dep", "--split", "experts"], "takes two positive attention,expert group sizes"),
    (["--strategy", "dep", "--split", "0,5"], "takes two positive attention,expert group sizes"),
    (["--strategy", "dep", "--split", "4,5"], "--split 4,5: 9 devices, but only 8 exist"),
    (["--split", "3,5"], "--split takes experts or tokens (EPS pipeline stages), got '3,5'"),
    (["--schedule", "pppipe"], "--schedule chooses a DEP schedule; add --strategy dep"),
    (["--strategy", "dep", "--quantize", "fp8"], "--strategy dep takes float experts"),
])
def test_bad_dep_flags_exit_2(capsys, argv, message):
    assert message in _error(capsys, "generate", "--max-new-tokens", "2", *argv)


def _generate_out(capsys, *argv) -> str:
    assert main(["generate", *argv]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("mode", ["lru", "lfu"])
def test_offloaded_experts_generate_the_same_tokens(capsys, mode):
    """--offload: the routed experts go from the checkpoint to host memory and a quarter of their bytes is cached on
    the device (2 of 16 experts here, 2 more in flight); the tokens equal the all-on-device run's."""
    common = ("--model", str(MIXTRAL), "--batch", "2", "--prompt-len", "8", "--max-new-tokens", "4")
    offloaded = _generate_out(capsys, *common, "--offload", mode, "--offload-budget", "0.25")
    line = re.search(r"^offload    (.*)$", offloaded, re.MULTILINE).group(1)
    assert line.startswith(f"{mode}: budget 0.25 of 0.38 MiB routed-expert bytes, 2 device slots for 2 x 8 experts")
    assert re.search(r"hit ratio [\d.]+ \(\d+ of \d+ expert uses resident\)", line), line
    assert "routed experts offloaded" in offloaded
    assert _outputs(offloaded) == _outputs(_generate_out(capsys, *common))


def test_expertflow_generates_the_same_tokens_with_the_checkpoints_predictor(capsys):
    pystdlib = Path(__file__).resolve().parents[1] / "checkpoints" / "pystdlib-moe"
    predictor = pystdlib.parents[1] / "scripts" / "results" / "expertflow_pystdlib_predictor"
    common = ("--model", str(pystdlib), "--dtype", "float32", "--batch", "2", "--prompt-len", "8",
              "--max-new-tokens", "3", "--no-token-healing")
    offloaded = _generate_out(capsys, *common, "--offload", "expertflow", "--offload-budget", "0.5", "--predictor",
                              str(predictor))
    assert re.search(r"^offload    expertflow: budget 0.5 .* hit ratio", offloaded, re.MULTILINE)
    assert _outputs(offloaded) == _outputs(_generate_out(capsys, *common))


@pytest.mark.parametrize("argv,message", [
    (["--offload", "lru", "--offload-budget", "0"], "--offload-budget must be a fraction of the routed-expert bytes "
                                                    "in (0, 1], got 0.0"),
    (["--offload", "lru", "--offload-budget", "1.5"], "in (0, 1], got 1.5"),
    (["--offload", "lru", "--offload-budget", "nan"], "in (0, 1], got nan"),
    (["--offload", "lru", "--offload-budget", "0.25", "--devices", "8", "--strategy", "dp_ep"],
     "--offload lru runs on one device (the host holds the routed experts, one device caches them); it does not "
     "combine with --strategy dp_ep"),
    (["--offload", "lfu"], "--offload lfu needs --offload-budget FRACTION"),
    (["--offload-budget", "0.5"], "--offload-budget sizes the device expert cache of --offload"),
    (["--offload", "lru", "--offload-budget", "0.05"], "--offload-budget 0.05 holds 0 of mixtral's 16 routed experts; "
                                                       "the cache needs 2 in flight + 1 slot: give at least 0.188"),
    (["--offload", "expertflow", "--offload-budget", "0.5"], "has no predictor/ directory; train one on this model's "
                                                             "routing (scripts/collect_routing_traces.py, then "
                                                             "scripts/train_predictor.py --out DIR)"),
])
def test_bad_offload_flags_exit_2(capsys, argv, message):
    assert message in _error(capsys, "generate", "--model", str(MIXTRAL), "--max-new-tokens", "2", *argv)
