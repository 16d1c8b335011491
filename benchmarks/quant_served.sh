#!/usr/bin/env bash
# Served throughput, core memory and KV capacity of every quantized engine (issue 14), one engine at a time.
#
# What it is for: the record in docs/perf/quantization.md. For each engine directory (default: every
# engines/q/small-qwen2-* and engines/q/qwen2.5-0.5b-*, built with `trtserve-build --model M --dtype D
# [--quant Q] [--kv-cache-dtype K] --no-validate --output engines/q/...`) it starts `trtserve-serve` with the
# KV pool capped at KV_BUDGET_BYTES (default 1 GiB), runs
#   trtserve-bench --engine E --target grpc://... --protocol native --concurrency 1,8 --requests 16 --warmup 2
#                  --input-len 64 --output-len 32 --no-plot --out OUT/<engine>
# (any further arguments are appended, so a later --requests 2 wins), then records in OUT/memory.tsv what the
# server and its engine-core process report: the core's resident memory after the run (VmRSS) and at its peak
# (VmHWM, load included), the served KV pool (trtserve_kv_cache_bytes, trtserve_kv_blocks_total) and from it
# the blocks that KV_BUDGET_BYTES holds. The core's RSS includes the KV pool, which torch zero-fills at start-up
# (min(budget, what the build's limits need)): compare engines at the same budget. Run it on a quiet machine;
# numbers taken under load are not a record.
# Not for: building engines, or writing docs (the numbers go into the docs by hand).
#
#   benchmarks/quant_served.sh docs/perf/<date>/quant
#   ENGINES=engines/q/qwen2.5-0.5b-fp32 benchmarks/quant_served.sh /tmp/smoke --requests 2      # smoke run
set -euo pipefail

OUT=${1:?usage: benchmarks/quant_served.sh OUT_DIR [extra trtserve-bench arguments]}
shift
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
KV_BUDGET_BYTES=${KV_BUDGET_BYTES:-1073741824}
ENGINES=${ENGINES:-$(ls -d engines/q/small-qwen2-* engines/q/qwen2.5-0.5b-* 2>/dev/null || true)}
START_TIMEOUT_S=${START_TIMEOUT_S:-900}
[ -n "$ENGINES" ] || { echo "no engines under engines/q/ (set ENGINES)" >&2; exit 2; }
mkdir -p "$OUT"
MEMORY="$OUT/memory.tsv"
printf 'engine\tcore_rss_mib\tcore_peak_rss_mib\tkv_pool_bytes\tkv_pool_blocks\tkv_bytes_per_block\tkv_blocks_per_budget\tkv_budget_bytes\n' > "$MEMORY"

free_port() { "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# "rss_kib hwm_kib" of the largest child of process $1 (the engine core; the server's other children are small)
core_memory() {
    local best_rss=0 best_hwm=0 child rss hwm
    for child in $(pgrep -P "$1" || true); do
        rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$child/status" 2>/dev/null || echo 0)
        hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$child/status" 2>/dev/null || echo 0)
        if [ "${rss:-0}" -gt "$best_rss" ]; then best_rss=$rss; best_hwm=$hwm; fi
    done
    echo "$best_rss $best_hwm"
}

metric() {  # metric NAME PORT: the first sample of NAME on the server's Prometheus endpoint
    "$BIN/python" - "$1" "$2" <<'EOF'
import sys, urllib.request
from prometheus_client.parser import text_string_to_metric_families
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[2]}/metrics", timeout=30).read().decode()
print(next(int(s.value) for f in text_string_to_metric_families(text) for s in f.samples if s.name == sys.argv[1]))
EOF
}

for ENGINE in $ENGINES; do
    name=$(basename "$ENGINE")
    port=$(free_port)
    metrics_port=$((port + 1))
    log="$OUT/$name.server.log"
    echo "== $name ($(date -u +%H:%M:%S))"
    TRTSERVE_KV_CACHE_MAX_BYTES=$KV_BUDGET_BYTES "$BIN/trtserve-serve" --engine "$ENGINE" --port "$port" \
        --metrics-port "$metrics_port" --no-http > "$log" 2>&1 &
    server=$!
    waited=0
    until grep -q "ready: " "$log"; do
        if ! kill -0 "$server" 2>/dev/null || [ "$waited" -ge "$START_TIMEOUT_S" ]; then
            echo "$name: the server did not become ready (see $log)" >&2
            kill "$server" 2>/dev/null || true
            wait "$server" 2>/dev/null || true
            continue 2
        fi
        sleep 1
        waited=$((waited + 1))
    done
    status=0
    "$BIN/trtserve-bench" --engine "$ENGINE" --target "grpc://127.0.0.1:$port" --protocol native \
        --concurrency 1,8 --requests 16 --warmup 2 --input-len 64 --output-len 32 --no-plot --no-progress \
        --out "$OUT/$name" "$@" || status=$?
    read -r rss hwm < <(core_memory "$server")
    pool_bytes=$(metric trtserve_kv_cache_bytes "$metrics_port" || echo 0)
    pool_blocks=$(metric trtserve_kv_blocks_total "$metrics_port" || echo 0)
    kill -TERM "$server"
    wait "$server" || true
    per_block=$((pool_blocks > 0 ? pool_bytes / pool_blocks : 0))
    printf '%s\t%d\t%d\t%d\t%d\t%d\t%d\t%d\n' "$name" $((rss / 1024)) $((hwm / 1024)) "$pool_bytes" "$pool_blocks" \
        "$per_block" $((per_block > 0 ? KV_BUDGET_BYTES / per_block : 0)) "$KV_BUDGET_BYTES" >> "$MEMORY"
    [ "$status" -eq 0 ] || echo "$name: trtserve-bench exited with $status" >&2
done
column -t -s $'\t' "$MEMORY"
