"""The code's layering, checked on the source: who may import whom, and no import cycles.

    faces (cli.py, mlxflow/serve.py)  ->  mlxflow.api  ->  the rest
    models/ (networks) read no file: no convert/, checkpoint, encoders or registry
    checkpoint.py and config.py know no registry
Every import counts, function-local ones included.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mlxflow", "convert", "cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files = [REPO / "cli.py", *(REPO / "mlxflow").rglob("*.py"), *(REPO / "convert").rglob("*.py")]
    return {_module_name(p): p for p in files}


def import_graph() -> tuple[dict[str, set[str]], dict[str, int]]:
    """({module: project modules it imports}, {module: function-local project imports})."""
    mods = _modules()
    graph, local = {}, {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        is_pkg = path.name == "__init__.py"
        graph[name], local[name] = set(), 0
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            found = {t for t in targets if t in mods and t != name}
            # `from pkg import module` names the module; the package itself only when nothing else is named.
            if len(found) > 1:
                found.discard(targets[0])
            if found:
                graph[name] |= found
                local[name] += id(node) not in top
    return graph, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph, _ = import_graph()
    # The package's __init__ imports the family configs (so they register); every submodule
    # implicitly loads its package first, which is not an edge of its own.
    graph = {m: {t for t in ts if t != "mlxflow"} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_faces_use_only_the_api():
    graph, _ = import_graph()
    assert graph["cli"] <= {"mlxflow", "mlxflow.api", "mlxflow.serve"}, graph["cli"]  # serve: the web face
    assert graph["mlxflow.serve"] <= {"mlxflow", "mlxflow.api"}, graph["mlxflow.serve"]


def test_networks_read_no_files():
    graph, _ = import_graph()
    banned = ("convert", "mlxflow.checkpoint", "mlxflow.encoders", "mlxflow.families", "mlxflow.api")
    for name, targets in graph.items():
        if name.startswith(("mlxflow.models", "mlxflow.torch_ref")):
            bad = [t for t in targets if t.startswith(banned)]
            assert not bad, (name, bad)


def test_checkpoint_and_config_know_no_registry():
    graph, _ = import_graph()
    for name in ("mlxflow.checkpoint", "mlxflow.config", "mlxflow.configs.encoders"):
        assert not {t for t in graph[name] if t.startswith(("mlxflow.families", "mlxflow.configs.emoji"))}, name


def test_few_function_local_imports():
    """Function-local imports of the project's own modules are for what must not load at import time."""
    _, local = import_graph()
    assert sum(local.values()) < 40, {k: v for k, v in local.items() if v}


def test_api_is_thin():
    assert len((REPO / "mlxflow" / "api.py").read_text().splitlines()) <= 360
