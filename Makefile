# The entry point for humans. `make run` starts Knocker; `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
BIND ?= 0.0.0.0:8000
PORT := $(lastword $(subst :, ,$(BIND)))
PY := $(VENV)/bin/python
KNOCKER := $(VENV)/bin/knocker
PYTEST_ARGS ?=

.PHONY: run test test-deps lint bench dist clean

# A venv rebuilt only when the package metadata changes (bottle's stamp idiom).
# Debian's python3 needs python3-venv for `-m venv`; install it when we may.
$(VENV)/.installed: setup.cfg pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >/dev/null && \
	  rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# First run: a knocker.yaml from the example, each placeholder a freshly generated key.
knocker.yaml: | $(VENV)/.installed
	@umask 077 && $(PY) -c 'import re, secrets, sys; \
	  text = open("knocker.yaml.example").read(); \
	  sys.stdout.write(re.sub(r"(?m)^(\s*key: \")REPLACE_WITH_A_GENERATED_KEY\w*\"", \
	                          lambda m: m[1] + secrets.token_urlsafe(32) + "\"", text))' > $@.tmp
	@mv $@.tmp $@
	@echo "Created knocker.yaml with freshly generated API keys (edit it to taste)."

run: $(VENV)/.installed knocker.yaml
	@$(KNOCKER) check-config knocker.yaml
	@echo "Knock from this machine with:"
	@echo "  curl -i -X POST -H \"X-Api-Key: \$$(awk '/^ *key:/ {gsub(/\"/, \"\", \$$2); print \$$2; exit}' knocker.yaml)\" http://127.0.0.1:$(PORT)/knock"
	@echo "then: curl -i http://127.0.0.1:$(PORT)/verify   (200 for a whitelisted caller, 401 otherwise)"
	exec $(KNOCKER) serve --config knocker.yaml --bind $(BIND)

test-deps:
	@bash tests/tools/install-test-deps.sh
	@bash tests/fwlab/prepare.sh --no-install
	@bash tests/tools/fetch-valkey.sh

test: $(VENV)/.installed-test test-deps
	$(PY) -m pytest $(PYTEST_ARGS)

# A report, not a test: prints req/s, latency, memory, startup and the issue-3 ratios.
bench: $(VENV)/.installed
	$(PY) -m tests.bench.run $(if $(filter-out 0,$(QUICK)),--quick,)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check knocker tests
	$(VENV)/bin/ruff format --check knocker tests
	$(VENV)/bin/mypy

# sdist, then the wheel built from it (which proves the sdist is complete)
dist: $(VENV)/.installed
	rm -rf dist
	$(PY) -m pip install -q build
	$(PY) -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache test-artifacts
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
