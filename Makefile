# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install once.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install demo docs lint test test-fast test-integration lock clean

$(STAMP): setup.cfg pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[test]'
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

lock: $(STAMP)
	(echo "# Full transitive lock for Python 3.11 / x86_64, produced by 'pip freeze' (make lock)."; \
	 $(PY) -m pip freeze --exclude-editable | grep -v '^distrib') > constraints.txt

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
