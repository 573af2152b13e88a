"""epsjax.host_memory's allocator tuning is an explicit call: importing epsjax never makes it, the CLI does.

`keep_freed_memory` changes glibc's malloc for the whole process and records what it did in
`host_memory._applied` (None: never called; True: applied; False: declined), so a fresh interpreter shows whether
importing the packages called it and whether the command did, before its first jax computation (a call after it
declines: too late for XLA's threads)."""

import platform
import subprocess
import sys

import pytest

from epsjax import cli, host_memory


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_epsjax_leaves_malloc_alone():
    applied = _run("import epsjax, epsjax.engine, epsjax.cli, epsjax.checkpoint, epsjax.offload, epsjax.dep, "
                   "epsjax.scheduler, epsjax.models, epsjax.sharding, epsjax.pallas_kernels\n"
                   "from epsjax import host_memory\n"
                   "print(host_memory._applied)")
    assert applied == "None"


def test_epsjax_package_imports_nothing():
    loaded = _run("import sys; before = set(sys.modules); import epsjax; "
                  "print(sorted(m for m in set(sys.modules) - before if m != 'epsjax'))")
    assert loaded == "[]"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_command_tunes_malloc_before_jax_starts():
    applied = _run("from epsjax import cli, host_memory\n"
                   "assert host_memory._applied is None\n"
                   "cli.main(['info', '--preset', 'tiny-mixtral'])\n"
                   "print(host_memory._applied)")
    assert applied == "True"  # False would mean it ran after the first jax computation


def test_the_command_calls_it(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(True))
    assert cli.main(["info", "--preset", "tiny-mixtral"]) == 0
    assert calls == [True]
