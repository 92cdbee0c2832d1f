# One command each: `make demo` starts the daemon on a demo license, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench mutation clean tools

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=/path/to/python3.11+)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev,report]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m lmgrd.vendor.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# FlexNet's tool names for lmutil (lmstat -a is lmutil lmstat -a), as symlinks beside it in the venv.
tools: $(STAMP)
	for t in lmstat lmremove lmreread lmdown lmhostid lmver; do ln -sf lmutil $(VENV)/bin/$$t; done

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Mutation testing of the core paths (not part of `make test`): score per module, survivors listed,
# fails below 85 % killed. MUTATION_WORKERS=2 by default; see tests/mutation/run.py.
mutation: $(STAMP)
	$(PY) -m pip install -qq -e '.[dev,mutation]'
	$(PY) tests/mutation/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
