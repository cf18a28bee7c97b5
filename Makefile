# `make demo` and `make test` create .venv and install everything they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint bench-ct clean browser docs docs-serve docs-reference

# The CPU build of PyTorch lies in /opt/wheels on this project's machines (a bare PyPI 'torch' is
# the CUDA build, several GB). uv installs in parallel and compiles the bytecode on every core:
# 65 s on a clean machine here, against 144 s for pip.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(VENV)/bin/uv pip install --python $(PY) -q --compile-bytecode $(WHEELS) -c constraints.txt \
	  torch==2.13.0 -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) cli.py demo

# Debian's chromium, for the tests that open rendered circuits in a headless browser.
browser:
	@command -v chromium >/dev/null || { echo "installing chromium for the browser tests ..."; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	  --no-install-recommends chromium >/dev/null; }

test: $(STAMP) browser
	$(PY) -m pytest -q

# The documentation site (docs/, mkdocs.yml) into site/; the reference pages are generated from the code.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

docs-reference: $(STAMP)
	$(PY) -m commands.reference

# circuit-tracer's graphs beside ours on the zoo (it gets a virtual environment of its own on first use).
bench-ct: $(STAMP)
	$(PY) -m bench.ct_parity

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .cache .pytest_cache site
