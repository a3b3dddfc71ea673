# One command runs the main job (`make demo`), one runs the tests (`make test`).
# Each creates .venv and installs the project first; torch is installed before the rest so
# pip takes the CPU build already on disk instead of pulling a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/hf-batchsched: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/hf-batchsched

demo: install
	$(BIN)/hf-batchsched demo

test: install
	$(BIN)/python -m pytest -n 2 -q

lint: install
	$(BIN)/ruff check hf_batchsched tests recipes benchmarks

clean:
	rm -rf $(VENV) outputs
