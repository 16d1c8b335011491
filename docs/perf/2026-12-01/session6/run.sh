# Quiet CPU record, 2026-12-01 session 6 (issue 13). Run from anywhere with nothing else running.
# c=16 rows are run with more requests than the c=1 / 4 rows so that they measure steady state, not the ramp.
set -x
cd "$(dirname "$0")/../../../.."
B=.venv/bin
O=docs/perf/2026-12-01/session6
N="quiet 2-vCPU Intel Xeon (AVX-512, AMX bf16/int8), torch 2.13.0+cpu, 2026-12-01 session 6"
R=${RUN:-run1}
for m in tiny-qwen2 small-qwen2 tiny-qwen2-vl; do
  [ -f engines/$m-fp32/engine.json ] || $B/trtserve-build --model $m --output engines/$m-fp32 --no-validate
done
bench() { $B/trtserve-bench --protocol native --warmup 4 --baseline hf --note "$N" --no-progress --no-plot "$@"; }
date; uptime
$B/python benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --baseline hf --token-ids-only --batch 16 --json $O/${R}_host_overhead_tiny-qwen2_cpu.json
date; uptime
bench --engine engines/tiny-qwen2-fp32 --concurrency 1,4 --requests 32 --input-len 32 --output-len 128 --out $O/${R}_tiny-qwen2_c1c4
bench --engine engines/tiny-qwen2-fp32 --concurrency 16 --requests 256 --input-len 32 --output-len 128 --out $O/${R}_tiny-qwen2_c16
date; uptime
bench --engine engines/small-qwen2-fp32 --concurrency 1,4 --requests 32 --input-len 128 --output-len 64 --out $O/${R}_small-qwen2_c1c4
bench --engine engines/small-qwen2-fp32 --concurrency 16 --requests 128 --input-len 128 --output-len 64 --out $O/${R}_small-qwen2_c16
bench --engine engines/small-qwen2-fp32 --concurrency 16 --requests 64 --input-len 128 --output-len 16:256 --out $O/${R}_small-qwen2-spread_c16
date; uptime
bench --engine engines/tiny-qwen2-vl-fp32 --concurrency 1,4 --requests 32 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --out $O/${R}_tiny-qwen2-vl_c1c4
bench --engine engines/tiny-qwen2-vl-fp32 --concurrency 16 --requests 256 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --out $O/${R}_tiny-qwen2-vl_c16
date; uptime
echo ALL_DONE
