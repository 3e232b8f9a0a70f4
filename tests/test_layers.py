"""The package's import graph, read with `ast` (imports inside functions and under TYPE_CHECKING
count too): every module sits on a layer, imports run only down or across a layer, no command imports
another command, and no two modules import each other, directly or round a longer circle.

    config (0) ← core (1) ← data, runtime, models, dictionaries (2) ← analysis, interop (3) ← commands (4)
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {"config": 0, "core": 1, "data": 2, "runtime": 2, "models": 2, "dictionaries": 2, "analysis": 3,
          "interop": 3}
COMMANDS = {"train", "evaluate", "convert", "export", "cache", "collect", "attribute", "saebench"}
COMMAND_LAYER = 4


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    found = {module_name(p): p for p in (SRC / "nn_decomp").rglob("*.py")}
    found |= {module_name(p): p for p in (SRC / "hydra_plugins").rglob("*.py")}
    return found


def imported(path: Path, known: set[str]) -> set[str]:
    """The package's modules `path` imports anywhere in it (`from a.b import c` names a.b.c when that
    is a module, else a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                      for alias in node.names}
    return {n for n in names if n in known}


def layer(module: str) -> int:
    if module.startswith("hydra_plugins"):  # a launcher: Hydra calls it like a command
        return COMMAND_LAYER
    parts = module.split(".")
    if len(parts) == 1:  # the package's __init__
        return 0
    if parts[1] in COMMANDS and len(parts) == 2:
        return COMMAND_LAYER
    assert parts[1] in LAYERS, f"{module} sits on no layer: add it to LAYERS (or COMMANDS) in this test"
    return LAYERS[parts[1]]


def is_command(module: str) -> bool:
    return layer(module) == COMMAND_LAYER


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {m: imported(p, set(found)) for m, p in found.items()}


def test_every_module_sits_on_a_layer(graph):
    for module in graph:
        layer(module)


def test_imports_run_down(graph):
    upward = [f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, bs in graph.items() for b in bs
              if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_command_imports_another(graph):
    crossing = [f"{a} imports {b}" for a, bs in graph.items() for b in bs if is_command(a) and is_command(b)
                and not a.startswith("hydra_plugins")]
    crossing += [f"{a} imports {b}" for a, bs in graph.items() for b in bs
                 if a.startswith("hydra_plugins") and is_command(b)]
    assert not crossing, "\n".join(crossing)


def test_no_import_cycle(graph):
    """Depth-first search; a grey node reached again closes a circle."""
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "grey"
        for nxt in sorted(graph[module]):
            if state.get(nxt) == "grey":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[module] = "black"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_checks_catch_what_they_look_for():
    """The graph reader sees an import inside a function, and the layer rule flags it."""
    known = {"nn_decomp.core.coder", "nn_decomp.analysis.patching", "nn_decomp.evaluate"}
    source = "def f():\n    from nn_decomp.analysis.patching import patched\nfrom nn_decomp import evaluate\n"
    path = SRC.parent / "tests" / "_layers_probe.py"
    try:
        path.write_text(source)
        found = imported(path, known)
    finally:
        path.unlink()
    assert found == {"nn_decomp.analysis.patching", "nn_decomp.evaluate"}
    assert layer("nn_decomp.analysis.patching") > layer("nn_decomp.core.coder")
    assert is_command("nn_decomp.evaluate") and not is_command("nn_decomp.analysis.evaluation")
