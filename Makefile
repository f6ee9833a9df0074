# Two commands for a fresh machine:
#   make demo   - install everything, prepare the embedded assets, scan SmolLM2-135M on Wikipedia
#   make test   - install everything (browser included), prepare the assets, run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= demo-out

.PHONY: install browser assets demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: torch==2.13.0 is the local CPU wheel; any other spec pulls a CUDA build.
install: $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || \
	  $(BIN)/pip install -q $$([ -d /opt/wheels ] && echo --find-links /opt/wheels) torch==2.13.0
	$(BIN)/pip install -q -e ".[all]"

# Debian's chromium for the browser test (playwright's own browser download is not used).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi; }

assets: install
	$(BIN)/layerscope assets fetch

demo: install assets
	$(BIN)/layerscope scan --out $(OUT)

test: install browser assets
	$(BIN)/python -m pytest -q

bench: install assets
	$(BIN)/python bench/scan_overhead.py

clean:
	rm -rf $(OUT) .pytest_cache build *.egg-info
