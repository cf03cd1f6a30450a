# graphrl: `make demo` runs the PPO example, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo grpo test bench clean trl

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphrl run examples/ppo.py

grpo: $(STAMP)
	$(VENV)/bin/graphrl run examples/grpo.py

# TRL, for benchmarks/vs_trl.py only (not needed by make test)
trl: $(STAMP)
	$(PY) -m pip install -q trl

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
