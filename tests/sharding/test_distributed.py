"""Two processes x 4 CPU devices (jax.distributed on localhost, gloo collectives) run the EP model on one global
mesh of 8 devices and give the single-process logits."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RULE_SET = "tp_ep"
SHAPE = dict(data=2, tensor=2, expert=2)  # the EP group (expert x tensor) spans both processes' devices
ROOT = Path(__file__).resolve().parents[2]


def config():
    from epsjax.models import get_preset

    return get_preset("tiny-mixtral", num_layers=2)


def inputs():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 256, (8, 8)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[2, :4] = False
    return tokens, mask


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
    from flax import nnx

    from epsjax.engine import Engine
    from epsjax.models import MoETransformer

    out = tmp_path / "logits.npy"
    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.sharding.distributed_worker", str(i), str(port), str(out)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the 2-process run timed out")
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} failed:\n{log[-4000:]}"

    tokens, mask = inputs()
    want, _, _ = Engine(MoETransformer(config(), rngs=nnx.Rngs(0))).prefill(tokens, mask, all_logits=True,
                                                                               cache_len=tokens.shape[1])
    got = np.load(out)
    err = np.abs(got - np.asarray(want))[mask].max()
    assert err < 1e-4, f"max |2-process logits - single-process logits| = {err}"
