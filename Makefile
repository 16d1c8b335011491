# trtserve: the commands a person runs. `make demo` and `make test` work on a
# fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= tiny-qwen2
DTYPE ?= fp32
RANDOM_WEIGHTS ?= 0
ENGINE_DIR ?= engines/$(MODEL)-$(DTYPE)

.PHONY: setup test demo engine clean

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints-cpu.txt -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=900 tests

engine: $(STAMP)
	$(VENV)/bin/trtserve-build --model $(MODEL) --dtype $(DTYPE) --output $(ENGINE_DIR) \
		$(if $(filter 1 true yes,$(RANDOM_WEIGHTS)),--random-weights,)

demo: $(STAMP)
	$(PY) -m runtime.demo

clean:
	rm -rf engines .cache
