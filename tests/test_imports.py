"""The import graph of epsjax's packages: no cycles, and each layer imports only the layers below it.

Every .py file of the installed packages (pyproject's [tool.setuptools.package-dir]: epsjax/, models/, sharding/,
pallas_kernels/ as epsjax, epsjax.models, epsjax.sharding, epsjax.pallas_kernels) is parsed with `ast`, and every
import statement counts, at module level or inside a function (a function-local import hides a cycle from the
first import but not from the program that calls the function).

Edges, from the module that holds the statement (relative imports are resolved against its package first):

    import a.b.c                  -> a.b.c
    from a.b import c             -> a.b.c   when c is a submodule of package a.b
                                  -> a.b     otherwise (c is a name that a/b/__init__.py or a/b.py defines)

A package is its __init__.py. Python also runs the __init__ of every enclosing package before a module (importing
epsjax.models.config runs epsjax/models/__init__.py first), but those implicit parent imports are *not* edges: a
module's body cannot see a partially initialised package unless it takes a name from the package itself, which is
the second `from` rule. So a package's __init__ re-exporting its submodules (epsjax.models -> epsjax.models.config)
makes no cycle with a submodule importing a sibling (epsjax.models.attention -> epsjax.models.config), while a
submodule that takes a name from its own package's __init__ (`from epsjax.models import ConfigError` inside
epsjax.models.moe, when the __init__ imports moe) is a real cycle: which half runs first depends on which module
the program imported first. A strongly connected component of more than one module, or a module importing itself,
fails the test, naming the modules and one cycle through them.

Layering (architecture.md): pallas_kernels imports nothing of epsjax but the error root epsjax.errors; sharding adds
pallas_kernels; models adds sharding; the top layer (the rest of epsjax) may import any of them.
"""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, pathlib.Path]:
    """Package name -> its folder, as pyproject installs them (epsjax.models -> models/)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {name: ROOT / path for name, path in config["package-dir"].items()}
    return dirs


def project_modules() -> dict[str, pathlib.Path]:
    """Every module's dotted name -> its file (a package's name -> its __init__.py)."""
    modules = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if any(p == "__pycache__" for p in parts):
                continue
            name = ".".join((package, *parts))
            if name.endswith(".__init__"):
                name = name[: -len(".__init__")]
            modules.setdefault(name, path)  # a sub-package's folder is also under its parent's folder
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(module: str, source: str, is_package: bool, known) -> set[str]:
    """The modules of `known` that `source` (the text of `module`) imports, by the rules in the docstring."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                out.add(submodule if submodule in known else base)
    return {name for name in out if name in known}


def import_graph(modules: dict[str, pathlib.Path] | None = None) -> dict[str, set[str]]:
    modules = project_modules() if modules is None else modules
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", modules)
            for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the graph's strongly connected components."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A cycle through the component's first module, as a path that returns to it (breadth-first: a shortest)."""
    members, start = set(component), component[0]
    if start in graph.get(start, ()):
        return [start, start]
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, ()) & members):
                if child == start:
                    path = [node]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per strongly connected component with more than one module (or a module importing itself)."""
    found = []
    for component in strongly_connected(graph):
        if len(component) > 1 or component[0] in graph.get(component[0], ()):
            found.append(f"{', '.join(component)}: {' -> '.join(one_cycle(graph, component))}")
    return found


# Layers, lowest first: each may import its own modules, the error root and the layers listed before it.
LAYERS = ("epsjax.pallas_kernels", "epsjax.sharding", "epsjax.models")
ERROR_ROOT = "epsjax.errors"


def layer_of(module: str) -> str:
    return next((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), "epsjax")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    order = (*LAYERS, "epsjax")
    found = []
    for module, targets in sorted(graph.items()):
        rank = order.index(layer_of(module))
        for target in sorted(targets):
            if target != ERROR_ROOT and order.index(layer_of(target)) > rank:
                found.append(f"{module} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return found


# The project ------------------------------------------------------------------------------------------------------


def test_every_package_is_found():
    modules = project_modules()
    for name in ("epsjax", "epsjax.errors", "epsjax.engine", "epsjax.offload.runtime", "epsjax.scheduler.hardware",
                 "epsjax.models", "epsjax.models.families.mixtral", "epsjax.sharding.ep_moe",
                 "epsjax.pallas_kernels.api"):
        assert name in modules, name


def test_pyproject_installs_every_package():
    """A wheel holds the packages pyproject lists, not those an editable install finds on disk: every folder with
    an __init__.py must be listed."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {name for name, path in project_modules().items() if path.name == "__init__.py"}
    assert on_disk == listed, (sorted(on_disk - listed), sorted(listed - on_disk))


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles (strongly connected modules: one cycle):\n" + "\n".join(found)


def test_layers_import_only_downward():
    found = layering_violations(import_graph())
    assert not found, "imports against the layering (pallas_kernels <- sharding <- models <- epsjax):\n" + \
        "\n".join(found)


def test_error_root_imports_nothing():
    graph = import_graph()
    assert graph[ERROR_ROOT] == set()
    assert graph["epsjax"] == set()  # importing the package runs nothing of the project


# The checks themselves, on small made-up sources --------------------------------------------------------------------


def _graph(sources: dict[str, str]) -> dict[str, set[str]]:
    packages = {name for name in sources if any(other.startswith(name + ".") for other in sources)}
    return {name: imports_of(name, text, name in packages, sources) for name, text in sources.items()}


def test_function_local_imports_and_cycles_are_found():
    graph = _graph({
        "p": "",
        "p.a": "from p.b import helper\n",
        "p.b": "def f():\n    from p import a\n    return a\n",  # function-local: still an edge
        "p.c": "import p.a\n",
    })
    assert graph["p.b"] == {"p.a"} and graph["p.c"] == {"p.a"}
    assert cycles(graph) == ["p.a, p.b: p.a -> p.b -> p.a"]


def test_self_import_is_a_cycle():
    assert cycles(_graph({"p": "", "p.a": "from p import a\n"})) == ["p.a: p.a -> p.a"]


def test_package_reexports_are_not_cycles_but_names_from_the_package_are():
    reexports = {
        "p": "from p.a import A\nfrom p.b import B\n",
        "p.a": "class A: ...\n",
        "p.b": "from p.a import A\nfrom . import a\n",  # submodules of p, absolute and relative: no edge to p
    }
    assert _graph(reexports)["p.b"] == {"p.a"}
    assert cycles(_graph(reexports)) == []
    reexports["p.b"] = "from p import A\n"  # a name from p's __init__, which imports p.b: a real cycle
    assert cycles(_graph(reexports)) == ["p, p.b: p -> p.b -> p"]


def test_layering_violations_are_found():
    graph = {"epsjax.pallas_kernels.api": {"epsjax.errors", "epsjax.sharding.mesh"},
             "epsjax.sharding.mesh": {"epsjax.pallas_kernels.api", "epsjax.errors"},
             "epsjax.models.moe": {"epsjax.sharding.mesh", "epsjax.engine"},
             "epsjax.engine": {"epsjax.models.moe"}}
    assert layering_violations(graph) == [
        "epsjax.models.moe (epsjax.models) imports epsjax.engine (epsjax)",
        "epsjax.pallas_kernels.api (epsjax.pallas_kernels) imports epsjax.sharding.mesh (epsjax.sharding)"]


@pytest.mark.parametrize("level, module, is_package, expected", [
    (1, "p.q.a", False, "p.q.x"), (2, "p.q.a", False, "p.x"), (1, "p.q", True, "p.q.x")])
def test_relative_imports_resolve(level, module, is_package, expected):
    assert _resolve_relative(module, is_package, level, "x") == expected
