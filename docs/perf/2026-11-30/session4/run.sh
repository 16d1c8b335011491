# Quiet CPU record, 2026-11-30 session 4 (issue 13). Run from the repository root with nothing else running.
set -x
cd "$(dirname "$0")/../../../.."
B=.venv/bin
O=docs/perf/2026-11-30/session4
N="quiet 2-vCPU Intel Xeon (AVX-512, AMX bf16/int8), torch 2.13.0+cpu, 2026-11-30 session 4"
for m in tiny-qwen2 small-qwen2 tiny-qwen2-vl; do $B/trtserve-build --model $m --output engines/$m-fp32 --no-validate; done
date; uptime
$B/python benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --baseline hf --token-ids-only --json $O/host_overhead_tiny-qwen2_cpu.json
date; uptime
$B/trtserve-bench --engine engines/tiny-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 32 --output-len 128 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_tiny-qwen2_cpu
date; uptime
$B/trtserve-bench --engine engines/tiny-qwen2-vl-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_tiny-qwen2-vl_cpu
date; uptime
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 128 --output-len 64 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_small-qwen2_cpu
date; uptime
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 16 --requests 32 --warmup 4 --input-len 128 --output-len 16:256 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_small-qwen2-spread_cpu
date; uptime
echo ALL_DONE
