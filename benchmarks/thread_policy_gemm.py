"""Microbenchmark behind the engine core's automatic thread policy (runtime/core/thread_policy.py).

What it is for: for each engine given, the GEMMs of one decode-like step (every decoder linear of every
layer with the shapes of its llm/config.json, gate and up fused as the CPU forward runs them, then the
LM head; random weights, `torch.mm` on the transposed weight as FloatLinear does) at several token counts,
timed at 1 and at 2 torch threads, interleaved, with and without a busy second process (a Python spin loop
standing in for the served front end on the other core). It prints, per token count, the step's work
(tokens x weight elements, the quantity the policy thresholds) and the median time per step at each thread
count: the smallest work at which 2 threads win is the threshold.
Not for: whole-model timing (benchmarks/host_overhead.py) or served throughput (trtserve-bench).

    .venv/bin/python benchmarks/thread_policy_gemm.py --engine engines/tiny-qwen2-fp32 engines/small-qwen2-fp32
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_format.engine_dir import load_engine  # noqa: E402
from runtime.core.thread_policy import ModelWork, model_work  # noqa: E402

SPIN = "while True: pass"


@dataclass(slots=True)
class StepGemms:
    """The weights [K, N] of one step's GEMMs, in forward order (the LM head last)."""

    layers: list[torch.Tensor]
    lm_head: torch.Tensor

    def inputs(self, tokens: int) -> list[torch.Tensor]:
        """One activation [tokens, K] per GEMM (made once, outside the timing)."""
        return [torch.randn(tokens, w.shape[0]) for w in (*self.layers, self.lm_head)]

    def run(self, inputs: list[torch.Tensor]) -> None:
        for x, w in zip(inputs, (*self.layers, self.lm_head)):
            torch.mm(x, w)


def step_gemms(engine_dir: str) -> tuple[StepGemms, ModelWork]:
    cfg = load_engine(engine_dir).llm_config
    hidden, inter = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_size, cfg.num_key_value_heads * cfg.head_size
    per_layer = [(hidden, q + 2 * kv), (q, hidden), (hidden, 2 * inter), (inter, hidden)]
    layers = [torch.randn(k, n) for _ in range(cfg.num_hidden_layers) for k, n in per_layer]
    return StepGemms(layers, torch.randn(hidden, cfg.vocab_size)), model_work(cfg)


def time_step(gemms: StepGemms, tokens: int, threads: int, min_seconds: float) -> float:
    """Median microseconds per step over batches of steps lasting about `min_seconds` in all."""
    torch.set_num_threads(threads)
    inputs = gemms.inputs(tokens)
    gemms.run(inputs)
    samples: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(samples) < 5:
        t0 = time.perf_counter()
        gemms.run(inputs)
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def measure(gemms: StepGemms, work: ModelWork, tokens_list: list[int], repeats: int, min_seconds: float
            ) -> list[dict[str, float]]:
    rows = []
    for tokens in tokens_list:
        one, two = [], []
        for _ in range(repeats):            # interleaved: 1, 2, 1, 2, ...
            one.append(time_step(gemms, tokens, 1, min_seconds))
            two.append(time_step(gemms, tokens, 2, min_seconds))
        rows.append({"tokens": tokens, "work": work.of_step(tokens, tokens), "us_1": statistics.median(one),
                     "us_2": statistics.median(two), "spread_1": max(one) - min(one), "spread_2": max(two) - min(two)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", nargs="+", required=True)
    parser.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=0.15, help="timing per (tokens, threads, repeat)")
    parser.add_argument("--spin", choices=("on", "off", "both"), default="both")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    tokens_list = [int(t) for t in args.tokens.split(",")]
    results: dict[str, dict[str, list[dict[str, float]]]] = {}
    for engine in args.engine:
        gemms, work = step_gemms(engine)
        results[engine] = {}
        for spin in (("off", "on") if args.spin == "both" else (args.spin,)):
            spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if spin == "on" else None
            try:
                time.sleep(0.2 if spinner else 0)
                rows = measure(gemms, work, tokens_list, args.repeats, args.seconds)
            finally:
                if spinner is not None:
                    spinner.kill()
                    spinner.wait()
            results[engine][spin] = rows
            print(f"\n{engine} (per token {work.per_token} + per sampled row {work.per_sampled} weight elements), "
                  f"spinner {spin}")
            print(f"{'tokens':>7} {'work':>12} {'1 thr us':>10} {'2 thr us':>10} {'2/1':>6}")
            for r in rows:
                print(f"{r['tokens']:>7} {r['work']:>12.3g} {r['us_1']:>10.1f} {r['us_2']:>10.1f} "
                      f"{r['us_2'] / r['us_1']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
