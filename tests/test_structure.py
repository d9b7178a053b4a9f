"""The package reads one way: the README's layout block is the import order (no module imports one drawn above
it, and every module is drawn), no import cycles, package imports at the top of modules, and the command line
starts without the heavy optional machinery (transformers, timm, TorchInductor) or the code of commands it does
not run."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "bigtransfer"


def _modules() -> dict[str, ast.Module]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__").removesuffix("__init__")] = ast.parse(path.read_text(encoding="utf-8"))
    return modules


def _target(module: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The package module an import names (None for other packages)."""
    if node.level == 0:
        return node.module[len("bigtransfer"):].lstrip(".") if (node.module or "").split(".")[0] == "bigtransfer" else None
    parts = module.split(".") if module else []
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package modules it imports (an `import` of a name from a package counts as the module
    of that name when there is one)."""
    graph = {}
    for module, tree in modules.items():
        is_package = any(other.startswith(module + ".") for other in modules) or module == ""
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(module, node, is_package)
                if target is None:
                    continue
                named = {f"{target}.{alias.name}".lstrip(".") for alias in node.names}
                found = {name for name in named if name in modules} or {target}
                edges |= {name for name in found if name in modules and name != module}
        # A module importing its own package's __init__ (or a parent package) is not an edge of the graph.
        graph[module] = {edge for edge in edges if not module.startswith(edge + ".") and edge != ""}
    return graph


def drawn_layers(readme: str) -> list[list[str]]:
    """The README's layout block, top line first: each line's modules (`x.py` -> "x", `x/` -> the package "x")."""
    block = readme.split("<!-- layout -->", 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines():
        if not re.match(r"^  \S", line):  # continuation lines are indented further
            continue
        names = []
        for token in line.split():
            if not (token.endswith(".py") or token.endswith("/")):
                break
            names.append(token.removesuffix("/").removesuffix(".py").removesuffix("__init__"))
        layers.append(names)
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """The index of the README line that places `module` (a package's line places its submodules too)."""
    for index, names in enumerate(layers):
        if any(module == name or (name and module.startswith(name + ".")) for name in names):
            return index
    return None


def upward_imports(graph: dict[str, set[str]], layers: list[list[str]]) -> list[str]:
    """Imports of a module drawn on a line above the importer's."""
    placed = {module: layer_of(module, layers) for module in set(graph) | set().union(*graph.values())}
    return [f"{module} imports {target}" for module, targets in sorted(graph.items()) for target in sorted(targets)
            if None not in (placed[module], placed[target]) and placed[target] < placed[module]]


def test_every_module_is_drawn_in_the_readme_layout():
    layers = drawn_layers((ROOT / "README.md").read_text(encoding="utf-8"))
    assert [module for module in _modules() if layer_of(module, layers) is None] == []


def test_no_module_imports_one_drawn_above_it():
    layers = drawn_layers((ROOT / "README.md").read_text(encoding="utf-8"))
    assert upward_imports(_imports(_modules()), layers) == []


def test_an_upward_import_is_caught():
    layers = drawn_layers((ROOT / "README.md").read_text(encoding="utf-8"))
    graph = _imports(_modules())
    graph["layers"] = graph["layers"] | {"train.loop"}  # the numerics importing the training loop
    assert upward_imports(graph, layers) == ["layers imports train.loop"]


def test_no_import_cycles():
    graph = _imports(_modules())
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for edge in sorted(graph[module]):
            if state.get(edge) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(edge):] + [edge]))
            if edge not in state:
                visit(edge, path + [edge])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_package_imports_are_at_the_top_of_modules():
    inside = []
    for module, tree in _modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("bigtransfer")):
                    inside.append(f"{module}.{function.name} imports {'.' * node.level}{node.module or ''}")
    assert not inside, inside


def test_import_bigtransfer_loads_no_training_and_the_parser_no_command_code():
    probe = (
        "import json, sys, bigtransfer; before = set(sys.modules); import bigtransfer.cli; "
        "bigtransfer.cli.build_parser(); print(json.dumps([sorted(before), sorted(set(sys.modules) - before)]))"
    )
    output = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    on_import, for_parser = json.loads(output)
    assert [name for name in on_import if name.startswith("bigtransfer.train")] == []
    command_code = ("bigtransfer.benchmark", "bigtransfer.peaks", "bigtransfer.demo", "bigtransfer.vtab",
                    "bigtransfer.train.loop", "bigtransfer.train.run")
    assert [name for name in for_parser if name.startswith(command_code)] == []


def test_the_command_line_starts_without_transformers_timm_or_inductor():
    probe = (
        "import sys, bigtransfer.cli; bigtransfer.cli.build_parser(); "
        "print(sorted({m.split('.')[0] if not m.startswith('torch._') else '.'.join(m.split('.')[:2]) for m in sys.modules}))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    for heavy in ("transformers", "timm", "torch._inductor", "torch._dynamo", "onnx", "onnxruntime", "matplotlib"):
        assert f"'{heavy}'" not in loaded, heavy


def test_no_test_module_imports_another():
    """Shared fixtures and helpers live in conftest.py; a test module importing another runs its module code twice."""
    importing = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            importing += [f"{path.name} imports {name}" for name in names if name.startswith("test_")]
    assert importing == []
