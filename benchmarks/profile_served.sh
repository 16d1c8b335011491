#!/usr/bin/env bash
# Profiles of both processes of a served run: py-spy samples trtserve-serve (the front end: gRPC, tokenization,
# detokenization, streaming) and its engine-core process (scheduler, executor, sampler) while trtserve-bench
# drives the server. What the profiles are for: seeing where a served run loses to in-process (issue 13).
#
#   benchmarks/profile_served.sh [--engine DIR] [--out DIR] [--rate HZ] [--format flamegraph|speedscope]
#                                [-- trtserve-bench workload and load arguments]
#
# Defaults: --engine engines/tiny-qwen2-fp32 (built from the tiny-qwen2 preset when missing), --out
# .cache/profiles/<UTC time>, --rate 100, --format flamegraph, and issue 13's row: --protocol native
# --concurrency 16 --requests 64 --warmup 4 --input-len 32 --output-len 128.
# Writes OUT/server.svg and OUT/core.svg (speedscope: *.speedscope.json; one lane per thread), OUT/bench.md and
# OUT/bench.json (the run's numbers), OUT/server.log. Sampling starts after the server is ready and stops when
# the bench ends, so the profiles hold the warm-up and the measured levels, not the engine load.
# py-spy (the `bench` extra) attaches by pid: it needs ptrace rights over the server (root, or
# kernel.yama.ptrace_scope = 0, or CAP_SYS_PTRACE in a container). Run it on a quiet machine; the sampling
# itself costs a few percent of one core.
set -euo pipefail

PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
ENGINE=engines/tiny-qwen2-fp32
OUT=.cache/profiles/$(date -u +%Y%m%dT%H%M%S)
RATE=100
FORMAT=flamegraph
BENCH_ARGS=(--protocol native --concurrency 16 --requests 64 --warmup 4 --input-len 32 --output-len 128)
while [[ $# -gt 0 ]]; do
    case $1 in
        --engine) ENGINE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --rate) RATE=$2; shift 2 ;;
        --format) FORMAT=$2; shift 2 ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        *) echo "profile_served.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
    esac
done
case $FORMAT in
    flamegraph) EXT=svg ;;
    speedscope) EXT=speedscope.json ;;
    *) echo "profile_served.sh: --format must be flamegraph or speedscope, got $FORMAT" >&2; exit 2 ;;
esac
command -v "$BIN/py-spy" >/dev/null || { echo "profile_served.sh: $BIN/py-spy missing (pip install py-spy)" >&2; exit 2; }
if [[ ! -f $ENGINE/engine.json ]]; then
    [[ $ENGINE == engines/tiny-qwen2-fp32 ]] || { echo "profile_served.sh: no engine at $ENGINE" >&2; exit 2; }
    "$BIN/trtserve-build" --model tiny-qwen2 --output "$ENGINE"
fi
mkdir -p "$OUT"
read -r PORT METRICS_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')

SERVER_PID=
SPY_PIDS=()
cleanup() {
    for pid in "${SPY_PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    for pid in "${SPY_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [[ -n $SERVER_PID ]]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
}
trap cleanup EXIT

"$BIN/trtserve-serve" --engine "$ENGINE" --port "$PORT" --metrics-port "$METRICS_PORT" --no-http \
    >"$OUT/server.stdout" 2>"$OUT/server.log" &
SERVER_PID=$!
for _ in $(seq 1 1200); do
    grep -q ready "$OUT/server.stdout" 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "profile_served.sh: the server exited; see $OUT/server.log" >&2; exit 1; }
    sleep 0.5
done
grep -q ready "$OUT/server.stdout" || { echo "profile_served.sh: the server was not ready in 600 s" >&2; exit 1; }
CORE_PID=$(pgrep -P "$SERVER_PID" -f runtime.core.core_process || true)
[[ -n $CORE_PID ]] || { echo "profile_served.sh: no engine-core process (was --no-engine-process set?)" >&2; exit 1; }

"$BIN/py-spy" record --pid "$SERVER_PID" --rate "$RATE" --threads --format "$FORMAT" --output "$OUT/server.$EXT" \
    2>"$OUT/py-spy-server.log" &
SPY_PIDS+=($!)
"$BIN/py-spy" record --pid "$CORE_PID" --rate "$RATE" --threads --format "$FORMAT" --output "$OUT/core.$EXT" \
    2>"$OUT/py-spy-core.log" &
SPY_PIDS+=($!)
sleep 1
for pid in "${SPY_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "profile_served.sh: py-spy could not attach (ptrace rights?); see $OUT/py-spy-*.log" >&2; exit 1; }
done

"$BIN/trtserve-bench" --target "grpc://127.0.0.1:$PORT" --metrics-url "http://127.0.0.1:$METRICS_PORT/metrics" \
    --no-progress --no-plot --out "$OUT/bench" --note "py-spy at $RATE Hz on both processes" "${BENCH_ARGS[@]}"
cleanup
trap - EXIT
echo "profiles: $OUT/server.$EXT (front end, pid $SERVER_PID), $OUT/core.$EXT (engine core, pid $CORE_PID)"
