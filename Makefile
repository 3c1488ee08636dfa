# The two set-up commands: `make demo` (train → export → probe on offline emoji data) and `make test`.
# Both create the virtual environment .venv/ once and reuse it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := fonts-noto-color-emoji unicode-data
DEMO_CONFIG ?= configs/demo-cpu.yaml

.PHONY: demo test lint system-deps clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# The demo data is rendered from two Debian packages (an emoji font and the Unicode emoji list).
system-deps:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "please install:$$missing (e.g. sudo apt-get install$$missing)"; exit 2; fi; \
	fi

demo: $(VENV)/.installed system-deps
	$(PY) -m dpcap demo --config $(DEMO_CONFIG) --out runs/demo

test: $(VENV)/.installed system-deps
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check dpcap launch tests benchmarks
	$(VENV)/bin/ruff format --check dpcap launch tests benchmarks

clean-demo:
	rm -rf runs/demo
