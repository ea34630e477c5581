# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on a
# fresh machine; `make demo` installs only what the demo needs (the core + the `train` extra),
# `make test` adds every extra, torch and the test tools. Later runs reuse .venv until
# setup.cfg changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch for the `convert` extra (weight import tests). On this project's machines
# the CPU wheel of 2.13.0 lies on disk; elsewhere set TORCH_SPEC to what suits the machine.
TORCH_SPEC ?= torch==2.13.0
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
WORKDIR ?= workdirs/digits
AUDIO_STAMP := $(VENV)/.installed-audio
SPEECH_DATA ?= workdirs/data/spoken_words
PYTEST_ARGS ?=

.PHONY: install test test-slow demo demo-speech lint bench clean

$(VENV)/.created:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	touch $@

$(DEMO_STAMP): setup.cfg pyproject.toml $(VENV)/.created
	$(PY) -m pip install -q -e ".[train]"
	touch $@

$(TEST_STAMP): setup.cfg pyproject.toml $(VENV)/.created
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[all,test,convert]"
	touch $@ $(DEMO_STAMP) $(AUDIO_STAMP)

# The speech demo installs only the package with its `train` and `audio` extras (no torch,
# no test tools).
$(AUDIO_STAMP): setup.cfg pyproject.toml $(VENV)/.created
	$(PY) -m pip install -q -e ".[train,audio]"
	touch $@

install: $(TEST_STAMP)

test: $(TEST_STAMP)
	$(PY) -m ruff check dml_jax experiments tests benchmarks
	$(PY) -m pytest -n 2 --dist load -m "not full_size" $(PYTEST_ARGS)

# The tests marked full_size: each seed paper's real network, one training step at its input
# size and batch (minutes per network on a CPU).
test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m full_size $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(PY) experiments/digits.py --workdir $(WORKDIR)

demo-speech: $(AUDIO_STAMP)
	$(PY) experiments/speech_words.py --config experiments/configs/speech_words.py \
		--config.data.data_dir=$(SPEECH_DATA)

lint: $(TEST_STAMP)
	$(PY) -m ruff check dml_jax experiments tests benchmarks

bench: $(TEST_STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache
