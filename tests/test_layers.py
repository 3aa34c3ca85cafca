"""The package's structure (README "Architecture"): imports go one way, every module
imports alone, the report needs no torch, and no function grows past one screen."""

import ast
import subprocess
import sys
from pathlib import Path

import imgvae

PACKAGE = Path(imgvae.__file__).parent
# Bottom to top. A module may import only modules listed before it, so there is no cycle.
LAYERS = [
    ("foundation", ["rundir", "config", "runtime"]),
    ("models and losses", ["models", "losses", "features", "optim", "interop", "checkpoint", "adversarial"]),
    ("data", ["decode", "sources", "cache", "datasets"]),
    ("what is done with models and data", ["prior", "sample", "evaluate", "latents", "export", "runlog", "train"]),
    ("report", ["report"]),
    ("entry points", ["workflow", "compare", "cli", "__main__"]),
]
ORDER = [module for _, modules in LAYERS for module in modules]
MAX_FUNCTION_LINES = 60


def imported_modules(path: Path) -> set[str]:
    """The package's modules that a file imports anywhere in it (function bodies too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("imgvae."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("imgvae.")}
    return found


def test_every_module_has_a_place_in_the_layers():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(ORDER), f"placed but missing: {set(ORDER) - modules}; not placed: {modules - set(ORDER)}"


def test_no_module_imports_one_above_it():
    upward = []
    for position, module in enumerate(ORDER):
        for imported in imported_modules(PACKAGE / f"{module}.py"):
            if imported not in ORDER[:position]:
                upward.append(f"{module} imports {imported}")
    assert imported_modules(PACKAGE / "__init__.py") <= {"config"}  # importing the package loads no torch
    assert not upward, upward


def test_each_module_imports_alone():
    script = f"""
import importlib, sys
for module in {ORDER[:-1]!r}:
    for name in [n for n in sys.modules if n == "imgvae" or n.startswith("imgvae.")]:
        del sys.modules[name]
    importlib.import_module("imgvae." + module)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_the_report_loads_no_torch():
    script = "import sys, imgvae.report; print(sorted({n.split('.')[0] for n in sys.modules}))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not {"torch", "torchvision", "torchmetrics", "numpy", "PIL"} & set(ast.literal_eval(result.stdout))


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} has {lines} lines")
    assert not long, long
