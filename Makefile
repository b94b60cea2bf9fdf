# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install once.
# PYTHON=python3.12 (or 3.13) works where that name is not on PATH but pyenv has the version installed.
PYTHON ?= python3.11
PYTHON_BIN := $(shell $(PYTHON) -c 'import sys; print(sys.executable)' 2>/dev/null || \
	ls -d $$(pyenv root 2>/dev/null)/versions/$(patsubst python%,%,$(PYTHON))*/bin/$(PYTHON) 2>/dev/null | tail -1)
PYVER := $(shell $(PYTHON_BIN) -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)
# One venv per interpreter; the lock is constraints-pyXY.txt where that interpreter needs its own, else constraints.txt.
VENV ?= $(if $(filter 311,$(PYVER)),.venv,.venv-py$(PYVER))
CONSTRAINTS ?= $(firstword $(wildcard constraints-py$(PYVER).txt) constraints.txt)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo docs lint test test-fast test-integration resolve lock clean offline-bundle

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -n "$(PYVER)" || { echo "PYTHON=$(PYTHON) not found (on PATH or under pyenv)"; exit 2; }
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e '.[all,test]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/distrib demo --out $(OUT)

# The docs site into site/ (tests/test_docs.py runs the same build with --strict).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) lint
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m unit $(PYTEST_ARGS)

test-integration: $(STAMP)
	$(PY) -m pytest -q -m integration $(PYTEST_ARGS)

# Whether pip resolves the package for PYTHON without installing it (scripts/resolve_check.py); .ci/run runs it
# on 3.12 and 3.13, where a full install costs more than CI's budget leaves.
resolve:
	@test -n "$(PYVER)" || { echo "PYTHON=$(PYTHON) not found (on PATH or under pyenv)"; exit 2; }
	$(PYTHON_BIN) scripts/resolve_check.py --constraints $(CONSTRAINTS)

# Writes this interpreter's own lock (constraints.txt for 3.11, constraints-pyXY.txt otherwise), never another's.
LOCK_OUT := $(if $(filter 311,$(PYVER)),constraints.txt,constraints-py$(PYVER).txt)
lock: $(STAMP)
	(echo "# Full transitive lock for Python $(PYVER) / x86_64, produced by 'pip freeze' (make lock)."; \
	 $(PY) -m pip freeze --exclude-editable | grep -v '^distrib') > $(LOCK_OUT).tmp && mv $(LOCK_OUT).tmp $(LOCK_OUT)

# Wheels an offline GPU node lacks (scripts/offline_bundle.py, docs/install.md). PY and OUT name the target's
# Python and the bundle folder only when given here: make offline-bundle PY=3.12 OUT=bundle/ [HAVE=freeze.txt] [SLIM=1]
BUNDLE_PYVER := $(subst $(eval) ,,$(wordlist 1,2,$(subst ., ,$(if $(filter command line,$(origin PY)),$(PY),3.12))))
BUNDLE_LOCK := $(firstword $(wildcard constraints-py$(BUNDLE_PYVER).txt) constraints.txt)
offline-bundle:
	$(PYTHON_BIN) scripts/offline_bundle.py --python $(if $(filter command line,$(origin PY)),$(PY),3.12) \
		--out $(if $(filter command line,$(origin OUT)),$(OUT),bundle) $(if $(HAVE),--have $(HAVE)) \
		$(if $(SLIM),--slim) --constraints $(BUNDLE_LOCK)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
