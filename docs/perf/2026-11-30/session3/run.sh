# Quiet CPU record, 2026-11-30 session 3 (issues 13, 14). Run from the repository root with nothing else running.
set -x
cd "$(dirname "$0")/../../../.."
B=.venv/bin
O=docs/perf/2026-11-30/session3
N="quiet 2-vCPU Intel Xeon (AVX-512, AMX bf16/int8; a different CPU than the earlier records), torch 2.13.0+cpu, transformers 5.23.0, 2026-11-30 session 3"
for m in tiny-qwen2 small-qwen2 tiny-qwen2-vl; do $B/trtserve-build --model $m --output engines/$m-fp32 --no-validate; done
date
$B/python benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --baseline hf --token-ids-only --json $O/host_overhead_tiny-qwen2_cpu.json
date
$B/python benchmarks/host_overhead.py --engine-dir engines/tiny-qwen2-fp32 --batch 16 --overlap off,on --repeats 3 --token-ids-only --waves 1 --output-len 64 --json $O/overlap_tiny-qwen2_cpu.json
$B/python benchmarks/host_overhead.py --engine-dir engines/small-qwen2-fp32 --batch 16 --overlap off,on --repeats 3 --token-ids-only --waves 1 --output-len 32 --json $O/overlap_small-qwen2_cpu.json
date
$B/trtserve-bench --engine engines/tiny-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 32 --output-len 128 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_tiny-qwen2_cpu
date
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 128 --output-len 64 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_small-qwen2_cpu
date
$B/trtserve-bench --engine engines/small-qwen2-fp32 --protocol native --concurrency 16 --requests 32 --warmup 4 --input-len 128 --output-len 16:256 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_small-qwen2-spread_cpu
date
$B/trtserve-bench --engine engines/tiny-qwen2-vl-fp32 --protocol native --concurrency 1,4,16 --requests 32 --warmup 4 --input-len 64 --output-len 32 --images-per-request 1 --image-size 224 --baseline hf --note "$N" --no-progress --no-plot --out $O/bench_tiny-qwen2-vl_cpu
date
echo SERVED_DONE
# issue 14: quantized engines served (engines/q/, built as in session2/README.md), KV pool capped at 1 GiB
ENGINES="$(ls -d engines/q/small-qwen2-{fp32,bf16,bf16-int8wo-kv8,fp32-w8a8,fp32-fp8-kvfp8,bf16-int4awq})" \
  bash benchmarks/quant_served.sh $O/quant --note "$N"
date
ENGINES="$(ls -d engines/q/qwen2.5-0.5b-{fp32,bf16,bf16-int8wo-kv8,fp32-w8a8,fp32-fp8-kvfp8,bf16-int4awq})" \
  bash benchmarks/quant_served.sh $O/quant-qwen2.5-0.5b --requests 8 --note "$N"
date
echo ALL_DONE
