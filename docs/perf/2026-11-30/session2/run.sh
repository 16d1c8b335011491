set -x
cd /work/main
B=.venv/bin
O=docs/perf/2026-11-30/session2
N="quiet 2-vCPU AMD EPYC (AVX2), torch 2.13.0+cpu, transformers 5.23.0, 2026-11-30 session 2 (rerun with nothing else running)"
date
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 16 --requests 32 --warmup 4 --input-len 128 --output-len 16:256 --baseline hf --note "$N" --no-progress --out $O/bench_small-qwen2-spread_cpu
date
$B/trtserve-bench --engine engines/tiny-llava-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --baseline hf --note "$N" --no-progress --out $O/bench_tiny-llava_cpu
date
for e in small-qwen2-fp32 small-qwen2-bf16 small-qwen2-bf16-int8wo-kv8 small-qwen2-fp32-w8a8 small-qwen2-fp32-fp8-kvfp8 small-qwen2-bf16-int4awq; do
  $B/trtserve-bench --engine engines/q/$e --protocol native --concurrency 1,8 --requests 16 --warmup 2 --input-len 64 --output-len 32 --note "$N" --no-progress --no-plot --out $O/quant/$e
  date
done
echo QUIET_DONE
