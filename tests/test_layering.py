"""Issue 24 part 1: layers that only point down.

Read from the source with `ast` (module-level and function-level imports both, so a lazy import cannot hide a
cycle): the package's import graph has no cycle; the library layers (speech/, text/, data/, models/,
distributed/, checkpoint/) never import the application layers (cli/, training/, inference/, convert/);
convert/ never imports training/, and nothing outside cli/ imports cli/ (its policy lives in the root modules
argtypes.py and tool.py). Then every module is imported for real, in two orders, in two fresh interpreters.
"""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import megatron_cslm

ROOT = Path(megatron_cslm.__file__).parent
PACKAGE = "megatron_cslm"
LIBRARY = ("speech", "text", "data", "models", "distributed", "checkpoint")
APPLICATION = ("cli", "training", "inference", "convert")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join((PACKAGE, *parts[:-1])) if parts[-1] == "__init__" else ".".join((PACKAGE, *parts))
        out[name] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its body (`from a import b`: a.b when b is a module)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:  # `import megatron_cslm.a.b.c` names a module or its package
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE + ".") and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_layers_only_point_down():
    wrong = []
    for module, targets in GRAPH.items():
        layer = _layer(module)
        for target in targets:
            to = _layer(target)
            if (layer in LIBRARY and to in APPLICATION) or (layer == "convert" and to == "training") \
                    or (to == "cli" and layer != "cli"):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))
    assert "megatron_cslm.argtypes" in GRAPH["megatron_cslm.cli"]  # cli/ uses the root modules, not the reverse


def test_every_module_imports_in_any_order():
    names = [m.name for m in pkgutil.walk_packages([str(ROOT)], PACKAGE + ".")]
    assert set(names) | {PACKAGE} == set(MODULES), sorted(set(MODULES) ^ (set(names) | {PACKAGE}))
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    for order in (sorted(names), sorted(names, reverse=True)):
        p = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=300,
                           cwd=ROOT.parent)
        assert p.returncode == 0, p.stderr[-3000:]
