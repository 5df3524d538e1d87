# Two commands do everything on a fresh machine: `make quickstart` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
UV := $(VENV)/bin/uv
# torch pinned and installed by pip: on CPU machines torch==2.13.0 is a local CPU wheel that pip's find-links see
# (uv does not look there; an open range pulls a multi-GB CUDA build). The rest is installed by uv, which resolves
# the same versions as pip in ~20 s instead of ~3 min; the pin is passed again so that a dependency asking for
# another torch fails the resolve instead of downloading one. Neither compiles bytecode at install (uv's default;
# pip's --no-compile: 11 s instead of 34 s for torch): Python compiles what is imported, once, on first import.
# That needs PYTHONDONTWRITEBYTECODE unset in the commands below (some machines set it): with it, every process the
# tests start (DDP workers, the command line, a killed-and-resumed run) compiled transformers, trl and lm-eval from
# source again, ~15 s each on 2 cores.
TORCH_PIN ?= torch==2.13.0
UV_PIN := uv==0.13.9
export TOKENIZERS_PARALLELISM := false
unexport PYTHONDONTWRITEBYTECODE

.PHONY: quickstart test test-slow install install-test install-serve browser dpo-quickstart instruct-quickstart bench gpu-check \
	clean deepspeed-fixtures

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip $(UV_PIN)
	$(PIP) install -q --no-compile $(TORCH_PIN)
	$(UV) pip install -q --python $(PY) $(TORCH_PIN) -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed
	$(UV) pip install -q --python $(PY) $(TORCH_PIN) -e '.[test,app]'
	touch $@

install-test: $(VENV)/.installed-test browser

# Debian's chromium for the browser tests (Playwright drives it through executable_path; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi; }

quickstart: install
	$(VENV)/bin/yulan-tune quickstart

dpo-quickstart: install
	$(VENV)/bin/yulan-tune quickstart --dpo

# SFT -> on-policy DPO -> GRPO, each stage's exact-match on 1000 held-out problems (+ DPO on the fixed pairs, compared)
instruct-quickstart: install
	$(VENV)/bin/yulan-tune quickstart --instruct --compare-fixed-pairs

test: install-test
	$(PY) -m pytest -q

# llama.cpp itself (llama-cpp-python, compiled from its sdist: cmake and g++ from Debian, ~5 min on 2 cores, so not
# part of `make test`'s 10 minutes) loads the exported GGUF: tokens, logits and greedy generations against transformers.
$(VENV)/.installed-serve: $(VENV)/.installed-test
	@command -v cmake >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null; \
	  else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null; fi; }
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(PIP) install -q -e '.[serve]'
	touch $@

install-serve: $(VENV)/.installed-serve

test-slow: install-serve
	$(PY) -m pytest -q tests/test_export_gguf.py

bench: install-test
	bash benchmarks/run_cpu.sh

# On a machine with a CUDA GPU and its own Python (no .venv, no package index): the GPU tests and benchmarks, < 10 min.
gpu-check:
	bash benchmarks/gpu_check.sh

# The DeepSpeed-written universal checkpoints under tests/fixtures/deepspeed (committed; ~2.3 MB). DeepSpeed lives in
# its own venv: the test suite checks that reading them does not need it. --no-deps keeps pip from replacing the CPU
# torch by a CUDA build; DS_BUILD_OPS=0 compiles nothing at install (the CPU FusedAdam is built on first use, ~1 min).
DS_VENV ?= .ds_venv
$(DS_VENV)/.installed:
	test -d $(DS_VENV) || $(PYTHON) -m venv $(DS_VENV)
	$(DS_VENV)/bin/pip install -q $(TORCH_PIN)
	DS_BUILD_OPS=0 $(DS_VENV)/bin/pip install -q --no-build-isolation --no-deps deepspeed==0.19.8
	$(DS_VENV)/bin/pip install -q hjson ninja py-cpuinfo msgpack einops psutil pydantic packaging numpy tqdm \
	  transformers==5.24.0
	touch $@

deepspeed-fixtures: $(DS_VENV)/.installed
	PYTHONPATH=. DS_ACCELERATOR=cpu $(DS_VENV)/bin/python tests/fixtures/deepspeed/make_fixtures.py

clean:
	rm -rf outputs .pytest_cache
