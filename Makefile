# graphrl: `make demo` runs the PPO example, `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0
# Training engines: built against the torch above (no build isolation, else deepspeed's
# sdist build pulls a CUDA torch); DeepSpeed's CPU communication op is compiled once here,
# into TORCH_EXTENSIONS_DIR, not on a test's first use (~80 s).
ENGINES := megatron-core==0.16.1 deepspeed==0.19.8
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo grpo test test-parallel bench clean trl

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation $(ENGINES)
	$(PY) -m pip install -q -e '.[dev,engines,loggers,lora]'
	DS_ACCELERATOR=cpu LOCAL_RANK=0 $(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphrl run examples/ppo.py

grpo: $(STAMP)
	$(VENV)/bin/graphrl run examples/grpo.py

# TRL, for benchmarks/vs_trl.py only (not needed by make test)
trl: $(STAMP)
	$(PY) -m pip install -q trl

# One OpenMP thread per process: the tests' models are tiny, and on a busy machine torch's
# spinning OpenMP barriers made a 2-thread run 10x slower in CPU time (measured: 272 s vs 29 s).
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

# The same tests, all but the Ray ones on two pytest-xdist workers (--dist loadgroup keeps
# each xdist_group in one worker: tests/conftest.py), then the Ray tests alone in one
# process: 11-12 min on CI's machine against ~13 for `make test`, but in its Ray step
# test_ray_cli's interrupted run did not stop on Ctrl-C in 3 of 4 CI runs (not
# reproduced standalone), so it is not the default.
test-parallel: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -n 2 --dist loadgroup -m "not ray"; a=$$?; \
	OMP_NUM_THREADS=1 $(PY) -m pytest tests -m ray; b=$$?; exit $$((a ? a : b))

clean:
	rm -rf $(VENV) build *.egg-info
