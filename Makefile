# One command each: `make demo` starts the daemon on a demo license, `make test` runs every test.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-storm bench-restart bench-scaling bench-deps bench-ha mutation fuzz soak clean tools i18n

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=/path/to/python3.11+)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[dev,report,cloud,ha]'
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

# Benchmarks (not part of make test, never run by CI): each updates its section of benchmarks/results.json and
# rewrites benchmarks/RESULTS.md and churn.png. They need the bench extra (redis-py + hiredis, matplotlib,
# py-spy) and Debian's redis-server for the Redis peer, installed here when missing (root, or sudo).
bench-deps: $(STAMP)
	$(PY) -m pip install -qq -e '.[dev,report,cloud,bench]'
	@command -v redis-server >/dev/null 2>&1 || test -x /usr/sbin/redis-server || { \
	  echo "installing redis-server (the benchmarks' Redis peer)"; \
	  { apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends redis-server >/dev/null; }; } && \
	  systemctl disable --now redis-server >/dev/null 2>&1 || true; }

bench: bench-deps            # churn at 100/1,000/5,000, burst 10,000 vs 8,000 seats (x5), idle at 1k/5k/10k (~7 min)
	$(PY) benchmarks/run.py bench

bench-storm: bench-deps      # 10,000 clients heartbeating every second for 30 s (~3 min)
	$(PY) benchmarks/run.py storm

bench-restart: bench-deps    # SIGKILL with 5,000 seats held, restart, every client resumes (~1 min)
	$(PY) benchmarks/run.py restart --repeat 3

bench-scaling: bench-deps    # products x customer IDs x held leases, 1 -> 1,000 and 100 -> 100,000 (~4 min)
	$(PY) benchmarks/run.py scaling

# HA (issue 11): journal vs 1- and 3-member etcd, same load; failover of 1,000 clients. Needs etcd (install-deps).
bench-ha: $(STAMP)
	$(PY) benchmarks/ha.py

# Mutation testing of the core paths (not part of `make test`): score per module, survivors listed,
# fails below 85 % killed. MUTATION_WORKERS=2 by default; see tests/mutation/run.py. One module at a time:
# .venv/bin/python tests/mutation/run.py --keep --module lmgrd/core/ledger.py (a full run takes hours).
mutation: $(STAMP)
	$(PY) -m pip install -qq -e '.[dev,mutation]'
	$(PY) tests/mutation/run.py

# Coverage-guided fuzzing (atheris) of the frame decoder, message validation, license/revocation files, options
# files, the config, registration requests and activation records: 1,000,000 inputs in all (FUZZ_SCALE=2 doubles
# it); fails on the first input that lets anything but the project's own error escape. make test runs the same
# targets briefly under hypothesis (tests/unit/test_fuzz_targets.py).
FUZZ_SCALE ?= 1
fuzz: $(STAMP)
	$(PY) -m pip install -qq -e '.[dev,fuzz]'
	$(PY) tests/fuzz/run.py --scale $(FUZZ_SCALE)

# The hostile-input regression tests at the issue's full sizes (make test runs them scaled down): 5,000 silent
# and 5,000 trickling connections per port with 100 honest clients, 430,000 hostile frames, 20,000 garbage
# connections.
soak: $(STAMP)
	LMGRD_SOAK=1 $(PY) -m pytest -q tests/integration/test_slowloris.py -p no:randomly

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis mutants
