# Two entry points on a fresh machine: `make demo` and `make test`.
# Each creates .venv with the pinned requirements (torch from PyPI brings CUDA
# libraries: a ~5.5 GB venv, about a minute to install) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test test-all test-floor lint docs clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(VENV)/.installed

# The seed VAE on photos shipped inside scikit-image / scikit-learn.
# Re-running starts the demo afresh in runs/demo.
demo: venv
	rm -rf runs/demo
	$(BIN)/imgvae train --config demo -o runs/demo
	@echo "pictures: runs/demo/grids/   TensorBoard: $(BIN)/tensorboard --logdir runs/demo/logs"

test: venv
	$(BIN)/python -m pytest -q

# Includes the checks marked slow.
test-all: venv
	$(BIN)/python -m pytest -q -m ""

# The suite on the oldest torch this project supports: the GPU machine's torch 2.11 and
# torchvision 0.26, everything else as pinned, run from the tree (PYTHONPATH=src) as there.
FLOOR := torch==2.11.0 torchvision==0.26.0
.venv-floor/.installed: requirements.txt
	$(PYTHON) -m venv .venv-floor
	grep -v '^torch==\|^torchvision==' requirements.txt > .venv-floor/requirements.txt
	.venv-floor/bin/python -m pip install -q -r .venv-floor/requirements.txt $(FLOOR)
	touch $@

test-floor: .venv-floor/.installed
	PYTHONPATH=src .venv-floor/bin/python -m pytest -q -p no:cacheprovider

# Line length, import order, pyflakes (pyproject.toml [tool.ruff]).
lint: venv
	$(BIN)/ruff check src tests bench

# The documentation site (docs/, mkdocs.yml) into site/; a warning (a broken link, a docstring that
# does not parse) fails the build.
docs: venv
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

clean:
	rm -rf $(VENV) .venv-floor runs .pytest_cache site
