"""The import graph of axpo, read from the imports themselves (every `import` and `from ... import`
in every module, at module level or inside functions): no circles, and dependencies point down
the layers of the architecture (../shared/architecture.md): records < ops < algo < tools <
models < rollout < tasks < train < cli; integrations are adapters nothing imports."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "axpo")

# part of axpo -> the parts it may import (besides itself)
ALLOWED = {
    "records": set(),
    "_ext": set(),
    "ops": {"_ext"},
    "algo": {"records", "ops"},
    "tools": set(),
    "models": {"ops"},
    "rollout": {"records", "ops", "tools", "models"},
    "tasks": {"records", "tools", "models"},
    "train": {"records", "ops", "algo", "tools", "models", "rollout", "tasks", "_ext"},
    "integrations": {"records", "ops", "algo", "tools", "models", "rollout", "tasks", "train"},
    "cli": {"records", "ops", "algo", "tools", "models", "rollout", "tasks", "train", "_ext"},
}


def _modules() -> dict[str, str]:
    """module name -> file, for every axpo module."""
    out = {}
    for directory, _, files in os.walk(ROOT):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(directory, f), os.path.dirname(ROOT))[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(directory, f)
    return out


def _imports(name: str, path: str, modules) -> set[str]:
    """The axpo modules `name` imports (`from pkg import sub` of a submodule counts as sub alone)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            subs = {f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules}
            found |= subs
            if len(subs) < len(node.names):  # names defined in `target` itself (not only its submodules)
                found.add(target)
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else "axpo"


def test_there_are_no_import_circles(graph):
    # Tarjan's strongly connected components; any of size > 1 is a circle
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == []


def test_dependencies_point_down_the_layers(graph):
    wrong = []
    for module, targets in graph.items():
        part = _part(module)
        if part == "axpo":
            continue
        for target in targets:
            other = _part(target)
            if other not in (part, "axpo") and other not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def test_the_graph_sees_the_imports(graph):
    """The reader finds relative, absolute and in-function imports (a test that cannot fail is a defect)."""
    assert "axpo.records" in graph["axpo.rollout.agent_loop"]
    assert "axpo.rollout.sampler" in graph["axpo.rollout.transformers_sampler"]
    assert "axpo.ops" in graph["axpo.rollout.transformers_sampler"]
    assert "axpo.models.loading" in graph["axpo.rollout.vllm_sampler"]  # imported inside a function
    assert set(ALLOWED) >= {_part(m) for m in graph if _part(m) != "axpo"}
