"""Test set-up: 8 virtual CPU devices (set before jax is imported), freed host memory kept (epsjax.host_memory),
float32 matmuls at full precision, and compiled programs released after each test module."""

import gc
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CLI, run in-process by the tests, would turn JAX's persistent compilation cache on for the whole session.
os.environ.setdefault("EPSJAX_COMPILATION_CACHE", "off")

import jax  # noqa: E402
import pytest  # noqa: E402

from epsjax.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as the command does (importing epsjax does not): before the suite's first jax computation

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Every XLA:CPU executable keeps its code mapped; the whole suite compiles thousands, which exhausts the
    process's memory-map limit (vm.max_map_count, 65530 here) unless each module's programs are dropped."""
    yield
    jax.clear_caches()
    gc.collect()
