"""Every error a user can cause is an epsjax.errors.EpsjaxError of its layer's type (epsjax/errors.py lists them),
never a plain ValueError or TypeError; internal invariants are assertions or RuntimeError.

The source check parses every module of the installed packages (tests/test_imports.py finds them) and lists each
`raise ValueError(...)` / `raise TypeError(...)` (also without arguments) with its file and line. ALLOWED names the
files whose raises another change is typing; an entry whose file no longer raises them fails too, so the list only
shrinks.
"""

from __future__ import annotations

import ast
import importlib

import jax.numpy as jnp
import pytest

from epsjax.errors import EpsjaxError
from tests.test_imports import ROOT, project_modules

PLAIN = ("ValueError", "TypeError")

# Files (relative to the repository root) allowed plain raises: none. Kept so that a file held back while it is
# rewritten can be listed, and the list can only shrink (test_allow_list_only_shrinks).
ALLOWED: set[str] = set()


def plain_raises(source: str) -> list[tuple[int, str]]:
    """(line, exception name) of every `raise ValueError(...)` / `raise TypeError` in the source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id in PLAIN:
                found.append((node.lineno, exc.id))
    return sorted(found)


def _raises_by_file() -> dict[str, list[tuple[int, str]]]:
    out = {}
    for path in project_modules().values():
        found = plain_raises(path.read_text())
        if found:
            out[str(path.relative_to(ROOT))] = found
    return out


def test_no_plain_value_or_type_errors():
    found = {f: r for f, r in _raises_by_file().items() if f not in ALLOWED}
    lines = [f"{f}:{line}: raise {name}" for f, raises in sorted(found.items()) for line, name in raises]
    assert not lines, ("plain ValueError/TypeError raised; raise the layer's EpsjaxError subclass (epsjax/errors.py) "
                       "for bad input, RuntimeError or an assertion for a bug:\n" + "\n".join(lines))


def test_allow_list_only_shrinks():
    found = _raises_by_file()
    stale = sorted(f for f in ALLOWED if f not in found)
    assert not stale, f"no plain ValueError/TypeError left in {stale}: remove them from ALLOWED"


def test_the_check_finds_plain_raises():
    source = ("def f(x):\n"
              "    if x:\n"
              "        raise ValueError(f'{x=}')\n"
              "    raise TypeError\n"
              "def g():\n"
              "    raise RuntimeError('a bug')\n")
    assert plain_raises(source) == [(3, "ValueError"), (4, "TypeError")]


def test_every_error_class_is_an_epsjax_error():
    """Each `class ...Error` of the packages subclasses the root (BudgetExceeded, an AssertionError, is the
    offload cache's internal invariant and not named ...Error)."""
    classes = []
    for module, path in project_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                classes.append((module, node.name))
    assert len(classes) >= 9, classes
    for module, name in classes:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, EpsjaxError) and issubclass(cls, ValueError), f"{module}.{name}"


# The layers' typed errors, one bad input each -------------------------------------------------------------------


def _group_gemm_bad_k():
    from epsjax import pallas_kernels

    pallas_kernels.group_gemm(jnp.zeros((4, 8)), jnp.zeros((2, 16, 8)), jnp.array([2, 2], jnp.int32),
                              backend="reference")


def _bad_tiling():
    from epsjax.pallas_kernels import ChunkTiling

    ChunkTiling(chunk=0)


def _bad_quantize():
    from epsjax.models.quantize import check_scheme

    check_scheme("int4")


def _bad_hlo_text():
    from epsjax.sharding import hlo_report

    hlo_report.entry_instructions("HloModule m\n")


def _bad_buckets():
    from epsjax.compilation import ShapeBuckets

    ShapeBuckets(min_length=3)


def _bad_hardware():
    from epsjax.scheduler import get_hardware

    get_hardware("no-such-gpu")


def _bad_plan():
    from epsjax.scheduler import Plan

    Plan(pipeline_degree=0)


def _bad_dep_split():
    from epsjax.dep.groups import expert_bounds

    expert_bounds(4, 8)


def _bad_policy():
    from epsjax.offload import make_policy

    make_policy("mru")


def _bad_histogram():
    from epsjax.scheduler import RoutingHistogram

    RoutingHistogram(num_layers=1, num_experts=4, decay=1.5)


def _bad_overrides():
    from epsjax.offload.traces import parse_overrides

    parse_overrides(["num_experts"])


@pytest.mark.parametrize("call, error, match", [
    (_group_gemm_bad_k, "epsjax.pallas_kernels.errors.KernelError", "disagree on K"),
    (_bad_tiling, "epsjax.pallas_kernels.errors.KernelError", "ChunkTiling.chunk"),
    (_bad_quantize, "epsjax.models.config.ConfigError", "quantize must be one of"),
    (_bad_hlo_text, "epsjax.sharding.errors.PlanError", "no ENTRY computation"),
    (_bad_buckets, "epsjax.compilation.BucketError", "min_length must be a power of two"),
    (_bad_hardware, "epsjax.scheduler.errors.ScheduleError", "unknown hardware 'no-such-gpu'"),
    (_bad_plan, "epsjax.scheduler.errors.ScheduleError", "pipeline_degree must be a positive int"),
    (_bad_dep_split, "epsjax.scheduler.errors.ScheduleError", "4 experts cannot be spread over 8"),
    (_bad_policy, "epsjax.offload.errors.OffloadError", "unknown eviction policy 'mru'"),
    (_bad_histogram, "epsjax.scheduler.errors.ScheduleError", r"decay must be in \[0, 1\)"),
    (_bad_overrides, "epsjax.offload.errors.OffloadError", "is not key=value"),
])
def test_bad_input_raises_its_layers_error(call, error, match):
    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(cls, match=match) as info:
        call()
    assert type(info.value) is cls and isinstance(info.value, EpsjaxError)
