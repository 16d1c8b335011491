#!/usr/bin/env bash
# The GPU suite (issue 15): one command on a machine with a CUDA GPU, run from the repository root
# (the project installed, or this checkout on PYTHONPATH: the script adds it), about 8 minutes:
#   1. tests/gpu: every Triton kernel against the reference op in bf16 / fp16, CUDA-graph decode against
#      eager decode (greedy tokens), a real-shape bf16 engine against HF on the GPU, KV pool sizing;
#   2. builds qwen2.5-0.5b and qwen2-vl-2b with random weights in bf16;
#   3. trtserve-bench --baseline hf at concurrency 1, 8, 32, 64 against a server it starts per engine,
#      records into docs/perf/ (bench_<model>_gpu_<tag>_{c1,c8-64}.{json,md,png});
#   4. one summary table (benchmarks/gpu_summary.py), also written as docs/perf/gpu_summary_<tag>.md.
# Knobs (environment): PYTHON (python3), TAG (UTC date-time), OUT_DIR (docs/perf), ENGINES (engines),
# SKIP_TESTS=1, SKIP_BUILD=1, VALIDATE=1 (run the build's CPU parity check; off by default for time),
# REQUESTS (64 per level at c >= 8), REQUESTS_C1 (8), KV_BYTES (KV cap of the bench server, bytes: the
# HF baseline shares the GPU), INPUT_LEN / OUTPUT_LEN (128 / 128 text), VL_INPUT_LEN (64), NOTE.
# A machine without a package registry: run benchmarks/gpu_wheels.sh where pip works; the suite installs
# .whl/*.whl into a private folder first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TAG=${TAG:-$(date -u +%Y%m%dT%H%M)}
OUT_DIR=${OUT_DIR:-docs/perf}
ENGINES=${ENGINES:-engines}
REQUESTS=${REQUESTS:-64}
REQUESTS_C1=${REQUESTS_C1:-8}
KV_BYTES=${KV_BYTES:-8589934592}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
VL_INPUT_LEN=${VL_INPUT_LEN:-64}
LOG_DIR=.cache/gpu-suite-$TAG
mkdir -p "$OUT_DIR" "$ENGINES" "$LOG_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/trtserve-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/trtserve-site"
fi
SECONDS=0
phase() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

phase "preflight: CUDA, Triton and the project's dependencies"
"$PY" - <<'PYEOF'
import importlib.metadata as md, re, sys, tomllib
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_suite: no CUDA device visible to torch; this suite needs a GPU")
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"] + ["triton", "pytest", "pytest-timeout"]
missing = []
for dep in deps:
    name = re.split(r"[\[<>=!~; ]", dep, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit("gpu_suite: missing packages: " + " ".join(missing) + " (pip install -e '.[dev,kernels]', or "
             "benchmarks/gpu_wheels.sh on a machine with a registry, then rerun with .whl/)")
print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {md.version('triton')} | "
      f"transformers {md.version('transformers')} | python {sys.version.split()[0]}")
PYEOF
DEVICE_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name())")

TEST_STATUS="skipped"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
    phase "tests/gpu"
    if "$PY" -m pytest -q -p no:cacheprovider --timeout=600 tests/gpu 2>&1 | tee "$LOG_DIR/tests_gpu.log"; then
        TEST_STATUS="passed"
    else
        TEST_STATUS="FAILED (log: $LOG_DIR/tests_gpu.log)"
    fi
    TEST_STATUS="$TEST_STATUS: $(grep -Eo '[0-9]+ (passed|failed|error|skipped)[^=]*' "$LOG_DIR/tests_gpu.log" | tail -1 || true)"
fi

VALIDATE_FLAG=--no-validate
[ "${VALIDATE:-0}" = 1 ] && VALIDATE_FLAG=
if [ "${SKIP_BUILD:-0}" != 1 ]; then
    for model in qwen2.5-0.5b qwen2-vl-2b; do
        phase "build $model (bf16, random weights)"
        "$PY" -m builder.cli --model "$model" --dtype bf16 --random-weights $VALIDATE_FLAG \
            --output "$ENGINES/$model-bf16" 2>&1 | tee "$LOG_DIR/build_$model.log"
    done
fi

bench() {   # bench MODEL EXTRA_WORKLOAD_ARGS...
    local model=$1; shift
    local engine="$ENGINES/$model-bf16" prefix="$OUT_DIR/bench_${model}_gpu_$TAG"
    local note="${NOTE:-$DEVICE_NAME, gpu_suite.sh $TAG}"
    local common=(--engine "$engine" --protocol native --baseline hf --warmup 4 --note "$note"
                  --server-arg=--device --server-arg=cuda --server-arg=--kv-cache-max-bytes --server-arg="$KV_BYTES"
                  --server-arg=--no-http --no-progress)
    phase "bench $model c=1"
    "$PY" -m bench.cli "${common[@]}" "$@" --concurrency 1 --requests "$REQUESTS_C1" --out "${prefix}_c1" \
        || BENCH_FAILURES+=" $model:c1"
    phase "bench $model c=8,32,64"
    "$PY" -m bench.cli "${common[@]}" "$@" --concurrency 8,32,64 --requests "$REQUESTS" --out "${prefix}_c8-64" \
        || BENCH_FAILURES+=" $model:c8-64"
}
BENCH_FAILURES=""
bench qwen2.5-0.5b --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN"
bench qwen2-vl-2b --input-len "$VL_INPUT_LEN" --output-len "$OUTPUT_LEN" --images-per-request 1 --image-size 448

phase "summary"
records=("$OUT_DIR"/bench_*_gpu_"$TAG"_*.json)
if [ -e "${records[0]}" ]; then
    "$PY" benchmarks/gpu_summary.py --markdown "${records[@]}" > "$OUT_DIR/gpu_summary_$TAG.md"
    "$PY" benchmarks/gpu_summary.py "${records[@]}"
fi
status="tests/gpu: $TEST_STATUS; bench failures:${BENCH_FAILURES:- none}; device: $DEVICE_NAME; total ${SECONDS}s"
echo "$status" | tee -a "$OUT_DIR/gpu_summary_$TAG.md"
[ -z "$BENCH_FAILURES" ] && [[ "$TEST_STATUS" != FAILED* ]]
