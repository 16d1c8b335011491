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

DEMO_ENGINE ?= engines/tiny-qwen2

demo: $(STAMP)
	$(VENV)/bin/trtserve-build --model tiny-qwen2 --output $(DEMO_ENGINE)
	@echo "--- one chat request, streamed (random weights: the text is noise, the pipeline is real)"
	$(VENV)/bin/trtserve-generate --engine $(DEMO_ENGINE) --chat --max-tokens 32 \
		--prompt "Write one sentence about the sea."
	@echo "--- four prompts in flight together, sampled with a seed"
	$(VENV)/bin/trtserve-generate --engine $(DEMO_ENGINE) --max-tokens 16 --temperature 0.8 --seed 7 \
		--prompt "The capital of France is" --prompt "def fibonacci(n):" \
		--prompt "Once upon a time" --prompt "你好，世界"

clean:
	rm -rf engines .cache
