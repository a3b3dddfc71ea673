# One command runs the main job (`make demo`), one runs the tests (`make test`: the whole suite in .venv with the
# newest releases, then `make test-oldest`).
# Each creates .venv and installs the project first; torch is installed before the rest so
# pip takes the CPU build already on disk instead of pulling a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

# `make test-oldest`: the integration tests again, in .venv-oldest, against the oldest supported releases
# (tests/oldest-versions.txt; keep it equal to the lower bounds in pyproject.toml).
OLDEST_VENV ?= .venv-oldest
OLDEST_BIN := $(OLDEST_VENV)/bin
OLDEST_TESTS ?= tests/test_trainer_ramp.py tests/test_checkpoints.py tests/test_packed.py tests/test_plateau_guard.py \
	tests/test_lr_trainer.py tests/test_recipe_resume.py tests/test_ddp.py
# transformers < 5.18 cannot load a 2-process CPU run's optimizer state (it maps it to "cpu:0"; fixed upstream in 5.18)
OLDEST_DESELECT ?= --deselect tests/test_checkpoints.py::test_resume_true_under_ddp_is_bit_exact_on_every_rank \
	--deselect tests/test_packed.py::test_ddp_padding_free_matches_one_process  # DDP: test_ddp.py runs; time budget

.PHONY: install demo test test-oldest lint clean

$(BIN)/hf-batchsched: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

install: $(BIN)/hf-batchsched

demo: install
	$(BIN)/hf-batchsched demo

# both jobs always run; make test fails if either fails
test: install
	$(BIN)/python -m pytest -n 2 -q; status=$$?; $(MAKE) test-oldest && exit $$status

$(OLDEST_BIN)/pytest: pyproject.toml tests/oldest-versions.txt
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(OLDEST_BIN)/pip install --quiet -c tests/oldest-versions.txt -e ".[trl]" pytest pytest-xdist scikit-learn
	touch $@

test-oldest: $(OLDEST_BIN)/pytest
	$(OLDEST_BIN)/python -m pytest -n 2 -q $(OLDEST_DESELECT) $(OLDEST_TESTS)

lint: install
	$(BIN)/ruff check hf_batchsched tests recipes benchmarks

clean:
	rm -rf $(VENV) $(OLDEST_VENV) outputs
