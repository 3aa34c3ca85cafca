"""The package's structure (docs/architecture.md), read from the folders: its rooms (the
top-level modules and the sub-packages) import one way, so each has a floor; training imports
no evaluation; every module imports alone and changes nothing on import; the report needs no
torch; no module, class or function outgrows a screen's worth of reading."""

import ast
import subprocess
import sys
from pathlib import Path

import imgvae

PACKAGE = Path(imgvae.__file__).parent
ARCHITECTURE = PACKAGE.parent.parent / "docs" / "architecture.md"
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 300, 60
FOUNDATION = {"config", "runtime", "rundir", "errors"}  # the top of the package: everything may use them


def modules() -> dict[str, Path]:
    """Dotted name under imgvae -> file, for every module of the package."""
    return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def room(module: str) -> str:
    """The room a module is in: its sub-package, or itself for a top-level module."""
    return module.split(".")[0]


def imported_modules(path: Path) -> set[str]:
    """The package's modules (dotted, under imgvae) that a file imports anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package imports by absolute names)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imgvae."):
            base = node.module.removeprefix("imgvae.")
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules() else base for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module == "imgvae":
            found |= {a.name for a in node.names if a.name in modules() or f"{a.name}.__init__" in modules()}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("imgvae.") for a in node.names if a.name.startswith("imgvae.")}
    return found


def room_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules().items():
        if name in ("__init__", "__main__"):
            continue
        graph.setdefault(room(name), set()).update(room(m) for m in imported_modules(path) if room(m) != room(name))
    return graph


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each room's floor: 0 for a room that imports none, else one above the highest it imports.
    Fails on a cycle (then no room is above the other)."""
    floor: dict[str, int] = {}

    def visit(node: str, path: tuple[str, ...]) -> int:
        assert node not in path, f"import cycle: {' -> '.join(path + (node,))}"
        if node not in floor:
            floor[node] = 1 + max((visit(n, path + (node,)) for n in graph.get(node, ())), default=-1)
        return floor[node]

    for node in graph:
        visit(node, ())
    return floor


def test_rooms_import_one_way_and_training_imports_no_evaluation():
    graph = room_graph()
    floor = floors(graph)
    assert set(graph) >= {"data", "models", "io", "train", "evaluation", "commands"} | FOUNDATION
    for name in FOUNDATION:
        assert graph[name] <= FOUNDATION, f"{name} imports {graph[name] - FOUNDATION}"
    assert "evaluation" not in graph["train"], "training imports evaluation code"
    assert not [r for r, uses in graph.items() if "commands" in uses], "a library room imports the commands"
    assert max(floor, key=floor.get) == "commands"
    assert imported_modules(PACKAGE / "__init__.py") <= {"config"}  # importing the package loads no torch


def test_modules_inside_each_room_import_one_way():
    for package in {room(m) for m in modules() if "." in m}:
        graph = {name: {m for m in imported_modules(path) if room(m) == package and m != name}
                 for name, path in modules().items() if room(name) == package}
        floors(graph)


def test_each_module_imports_alone_and_changes_nothing_on_import():
    names = sorted(m.removesuffix(".__init__") for m in modules() if m != "__main__")
    # The libraries' own imports set warning filters; imgvae's must not change anything. diffusers is
    # among them: export/pipeline.py is diffusers code (copied into exported folders) and imports it.
    script = f"""
import importlib, signal, sys, warnings
import numpy, PIL.Image, safetensors, torch, torchmetrics, torchvision, tqdm, yaml, diffusers
before = (warnings.formatwarning, warnings.showwarning, list(warnings.filters), signal.getsignal(signal.SIGTERM))
for module in {names!r}:
    for name in [n for n in sys.modules if n == "imgvae" or n.startswith("imgvae.")]:
        del sys.modules[name]
    importlib.import_module("imgvae." + module if module != "__init__" else "imgvae")
    now = (warnings.formatwarning, warnings.showwarning, list(warnings.filters), signal.getsignal(signal.SIGTERM))
    assert now == before, module
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_report_and_the_config_load_no_torch():
    script = ("import sys, imgvae.evaluation.report, imgvae.config.reference; "
              "print(sorted({n.split('.')[0] for n in sys.modules}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not {"torch", "torchvision", "torchmetrics", "numpy", "PIL"} & set(ast.literal_eval(result.stdout))


def test_no_module_class_or_function_outgrows_its_size():
    large = []
    for name, path in modules().items():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            large.append(f"{name} has {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            lines = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and lines > MAX_CLASS_LINES:
                large.append(f"{name}:{node.name} (class) has {lines} lines")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and lines > MAX_FUNCTION_LINES:
                large.append(f"{name}:{node.name} has {lines} lines")
    assert not large, large


def test_the_architecture_page_shows_every_room_and_module():
    section = ARCHITECTURE.read_text()
    missing = [name for name in modules() if name not in ("__init__", "__main__") and not name.endswith("__init__")
               and f"{name.split('.')[-1]}.py" not in section]
    missing += [f"{r}/" for r in {room(m) for m in modules() if "." in m} if f"{r}/" not in section]
    assert not missing, f"docs/architecture.md does not show {missing}"
