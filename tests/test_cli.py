"""The `epsjax` command line: text prompts through tokenizer.json, info, errors, and the README's demo run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from safetensors.numpy import load_file

from epsjax.cli import main

MIXTRAL = Path(__file__).parent / "fixtures" / "hf" / "mixtral"


def test_generate_from_text_matches_transformers(capsys):
    meta = json.loads((MIXTRAL / "meta.json").read_text())
    expected = load_file(str(MIXTRAL / "expected.safetensors"))["text_greedy"][0].tolist()
    assert main(["generate", "--model", str(MIXTRAL), "--dtype", "float32", "--text", meta["text_prompt"],
                 "--max-new-tokens", "6"]) == 0
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
