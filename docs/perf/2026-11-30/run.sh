set -x
cd /work/main
B=.venv/bin
O=docs/perf/2026-11-30
N="quiet 2-vCPU AMD EPYC, torch 2.13 CPU, 2026-11-30, after issues 10-16 helpers"
$B/trtserve-build --model tiny-qwen2 --output engines/tiny-qwen2-fp32
$B/trtserve-build --model small-qwen2 --output engines/small-qwen2-fp32
$B/trtserve-build --model tiny-qwen2-vl --output engines/tiny-qwen2-vl-fp32
date
$B/trtserve-bench --engine engines/tiny-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 32 --output-len 128 --baseline hf --note "$N" --no-progress --out $O/bench_tiny-qwen2_cpu
date
.venv/bin/python benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --baseline hf --json $O/host_overhead_tiny-qwen2_cpu.json
date
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 128 --output-len 64 --baseline hf --note "$N" --no-progress --out $O/bench_small-qwen2_cpu
date
$B/trtserve-bench --engine engines/tiny-qwen2-vl-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --baseline hf --note "$N" --no-progress --out $O/bench_tiny-qwen2-vl_cpu
date
$B/trtserve-bench --engine engines/smollm2-135m --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 128 --output-len 64 --baseline hf --note "$N" --no-progress --out $O/bench_smollm2-135m_cpu
date
echo BENCH_DONE
