"""`epsjax serve`: --warmup leaves nothing for requests to compile; flag errors are one line and exit 2; the
command listens on 127.0.0.1 and serves (a subprocess, stopped by the test)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

from flax import nnx

from epsjax.cli import main
from epsjax.compilation import CompileCounter
from epsjax.engine import Engine
from epsjax.models import MoETransformer, get_preset
from epsjax.serve import Background, make_server
from tests.serve.conftest import client, http


def test_after_warmup_no_request_compiles():
    engine = Engine(MoETransformer(get_preset("tiny-mixtral"), rngs=nnx.Rngs(1)))
    server = make_server(engine, model_name="tiny", num_slots=2, cache_len=32, warmup=True)  # one length bucket
    assert server.warmup["programs"] > 0
    with Background(server) as port, CompileCounter() as compiled:
        c, done = client(port), []

        def ask(n, new, temperature):  # prompts of 1..16 tokens, up to 2 requests at once
            out = c.completions.create(model="tiny", prompt=list(range(1, 1 + n)), max_tokens=new,
                                       temperature=temperature, seed=3)
            done.append(out.usage.completion_tokens)

        threads = [threading.Thread(target=ask, args=args) for args in ((1, 5, 0.0), (16, 9, 0.7), (3, 16, 0.0),
                                                                        (10, 2, 1.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert sorted(done) == [2, 5, 9, 16]
    assert compiled.programs == 0


def test_flag_errors_are_one_line(capsys):
    assert main(["serve", "--preset", "tiny-mixtral", "--max-model-len", "100000"]) == 2
    assert "exceeds the model's maximum sequence length 256" in capsys.readouterr().err
    assert main(["serve", "--preset", "tiny-mixtral", "--api-key", ""]) == 2
    assert "--api-key is empty" in capsys.readouterr().err


def test_the_command_serves():
    env = dict(os.environ, JAX_PLATFORMS="cpu", EPSJAX_COMPILATION_CACHE="off", EPSJAX_API_KEY="k")
    process = subprocess.Popen([sys.executable, "-m", "epsjax.cli", "serve", "--preset", "tiny-mixtral", "--port", "0",
                                "--max-slots", "2", "--max-model-len", "64"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines, deadline, port = [], time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
            port = int(found.group(1)) if found else None
        assert port is not None, "".join(lines)
        assert http(port, "/health")[0] == 200 and http(port, "/v1/models")[0] == 401
        out = client(port, "k").completions.create(model="tiny-mixtral", prompt=[1, 2, 3], max_tokens=3)
        assert out.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
    assert process.returncode == 0
