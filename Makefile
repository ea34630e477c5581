# The two set-up commands of the README: `make demo` and `make test`. Both create .venv on a
# fresh machine and install what they need; later runs reuse it until setup.cfg changes.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A CPU build of torch for the `convert` extra (weight import tests). On this project's machines
# the CPU wheel of 2.13.0 lies on disk; elsewhere set TORCH_SPEC to what suits the machine.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
WORKDIR ?= workdirs/digits
AUDIO_STAMP := $(VENV)/.installed-audio
SPEECH_DATA ?= workdirs/data/spoken_words
PYTEST_ARGS ?=

.PHONY: install test demo demo-speech lint bench clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,convert]"
	touch $(STAMP)

# The speech demo installs only the package and its `audio` extra (no torch, no test tools).
$(AUDIO_STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e ".[audio]"
	touch $(AUDIO_STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check dml_jax experiments tests benchmarks
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) experiments/main.py --config experiments/configs/digits.py --workdir $(WORKDIR)

demo-speech: $(AUDIO_STAMP)
	$(PY) experiments/speech_words.py --config experiments/configs/speech_words.py \
		--config.data.data_dir=$(SPEECH_DATA)

lint: $(STAMP)
	$(PY) -m ruff check dml_jax experiments tests benchmarks

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) workdirs .pytest_cache .ruff_cache
