# One command each: `make demo` starts the daemon on a demo license, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench mutation clean tools i18n

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=/path/to/python3.11+)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev,report,cloud]'
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

# gettext catalogs: extract the English msgids (Babel), merge them into each language's .po, compile the .mo
# files that ship as package data. Both .po and .mo are committed, so a fresh clone runs without this step;
# tests/unit/client_stub/test_i18n.py fails if a .mo is stale or a msgid is untranslated.
I18N_DOMAINS := client_stub lmgrd
i18n: $(STAMP)
	for d in $(I18N_DOMAINS); do \
	  $(VENV)/bin/pybabel -q extract -F babel.cfg -k gettext_ -k tr -c TRANSLATORS: --no-location --sort-output \
	    --project lmgrd --copyright-holder lmgrd -o $$d/locale/$$d.pot $$d && \
	  if [ -f $$d/locale/ja/LC_MESSAGES/$$d.po ]; then \
	    $(VENV)/bin/pybabel -q update --no-fuzzy-matching --ignore-obsolete \
	      -i $$d/locale/$$d.pot -d $$d/locale -D $$d; \
	  else $(VENV)/bin/pybabel -q init -i $$d/locale/$$d.pot -d $$d/locale -D $$d -l ja; fi && \
	  $(VENV)/bin/pybabel -q compile -d $$d/locale -D $$d || exit 1; \
	done

bench: $(STAMP)
	$(PY) benchmarks/run.py

# Mutation testing of the core paths (not part of `make test`): score per module, survivors listed,
# fails below 85 % killed. MUTATION_WORKERS=2 by default; see tests/mutation/run.py.
mutation: $(STAMP)
	$(PY) -m pip install -qq -e '.[dev,mutation]'
	$(PY) tests/mutation/run.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
