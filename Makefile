# Two commands do everything: `make demo` and `make test`. Both create .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install lint clean test-sglang

$(STAMP): pyproject.toml
	# bubblewrap isolates sandboxed code tests (read-only root, no network, PID namespace); without it the
	# sandbox falls back to rlimits and warns. Best effort: needs root and Debian's apt.
	command -v bwrap >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get install -y -q bubblewrap >/dev/null 2>&1 || \
		 (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap >/dev/null 2>&1)); } || \
		echo "note: bubblewrap not installed; the code sandbox will use rlimits only"
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
	# CPU torch first: otherwise pip resolves a multi-GB CUDA build through lightning/transformers.
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q "torch>=2.5"; \
	else $(BIN)/pip install -q torch==2.13.0; fi 2>&1 | grep -v "is ignored" || true
	$(BIN)/pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(BIN)/python -c "import torch, lightning, transformers, lrl" 
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=600 tests

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check lrl callbacks datamodules scripts tests

# The real sglang package in its own venv (it pins its own torch/transformers and a CUDA-13 stack; lrl goes in
# without dependencies). Runs only the tests marked sglang_pkg, which need the package but no GPU. No fallback:
# if pip cannot install sglang, the target fails (CI must not pass without having run these tests).
SGLANG_VENV := .venv-sglang
SGLANG_STAMP := $(SGLANG_VENV)/.installed
SGLANG_PIN ?= sglang==0.5.23

$(SGLANG_STAMP): SHELL := /bin/bash
$(SGLANG_STAMP): .SHELLFLAGS := -o pipefail -c
$(SGLANG_STAMP): pyproject.toml
	test -d $(SGLANG_VENV) || $(PY) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/pip install -q --upgrade pip 2>&1 | { grep -v "is ignored" || true; }
	$(SGLANG_VENV)/bin/pip install -q "$(SGLANG_PIN)" "pytest>=8" "pytest-timeout>=2.3" 2>&1 | { grep -v "is ignored" || true; }
	$(SGLANG_VENV)/bin/pip install -q --no-deps -e . 2>&1 | { grep -v "is ignored" || true; }
	$(SGLANG_VENV)/bin/python -W ignore -c "import sglang, sglang.srt.dllm.algorithm, lrl.rollout.sglang_plugin"
	touch $(SGLANG_STAMP)

# LRL_REQUIRE_SGLANG: a missing or broken sglang fails these tests instead of skipping them.
test-sglang: $(SGLANG_STAMP)
	LRL_REQUIRE_SGLANG=1 OMP_NUM_THREADS=1 $(SGLANG_VENV)/bin/python -m pytest -q -x --timeout=600 -m sglang_pkg \
		-p no:cacheprovider tests/test_sglang_real.py

clean:
	rm -rf $(VENV)
