"""Offline throughput: trtserve's in-flight batching engine vs HF `generate` with static batches.

Same weights, same prompts, same greedy decoding, same output lengths (EOS
ignored). For each concurrency c the engine keeps c requests in flight (closed
loop: a finished request is replaced by the next); HF runs the requests in
static batches of c (left-padded), each batch running until its longest
request is done. Output tok/s counts only the tokens each request asked for.

    python benchmarks/offline_throughput.py --model small-qwen2 --concurrency 1,2,4,8,16
"""
from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from builder.pipeline import BuildRequest, build_engine
from bench.baseline import generate_static_batch
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest
from runtime.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    prompts: list[list[int]]
    output_lens: list[int]


@dataclass(frozen=True, slots=True)
class Result:
    system: str
    workload: str
    concurrency: int
    num_requests: int
    output_tokens: int
    seconds: float

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.seconds


def make_workloads(vocab: int, num_requests: int, seed: int, fixed_len: int) -> list[Workload]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab - 16) for _ in range(rng.randint(32, 128))] for _ in range(num_requests)]
    spread = [rng.randint(16, 256) for _ in range(num_requests)]
    return [Workload(f"fixed-{fixed_len}", prompts, [fixed_len] * num_requests),
            Workload("spread-16-256", prompts, spread)]


def run_engine(core: EngineCore, work: Workload, concurrency: int) -> Result:
    pending = list(range(len(work.prompts)))
    start = time.perf_counter()
    in_flight = 0
    produced = 0
    tag = f"{work.name}-{concurrency}-{time.monotonic_ns()}"
    while pending or core.has_unfinished():
        while pending and in_flight < concurrency:
            i = pending.pop(0)
            params = SamplingParams(max_tokens=work.output_lens[i], temperature=0.0, ignore_eos=True)
            core.add_request(EngineRequest(f"{tag}-{i}", work.prompts[i], params))
            in_flight += 1
        for out in core.step():
            produced += len(out.token_ids)
            in_flight -= out.finished
    seconds = time.perf_counter() - start
    return Result("trtserve", work.name, concurrency, len(work.prompts), produced, seconds)


def run_hf(model, work: Workload, concurrency: int, pad_id: int) -> Result:
    start = time.perf_counter()
    produced = 0
    for first in range(0, len(work.prompts), concurrency):
        lens = work.output_lens[first:first + concurrency]
        timing = generate_static_batch(model, work.prompts[first:first + concurrency], lens, pad_id)
        produced += sum(len(ids) for ids in timing.output_ids)   # tokens past a request's own length: waste
    seconds = time.perf_counter() - start
    return Result("hf-generate", work.name, concurrency, len(work.prompts), produced, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small-qwen2")
    parser.add_argument("--engine-dir", type=Path, default=None)
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--fixed-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--systems", default="trtserve,hf")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the engine runs; print the top functions by own time at the end")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    engine_dir = args.engine_dir or Path("engines") / f"{args.model}-fp32"
    build_engine(BuildRequest(model=args.model, output=engine_dir, dtype="fp32", validate=False))
    core = EngineCore.from_dir(engine_dir, EngineConfig(device="cpu", max_batch_size=max(levels)))
    workloads = make_workloads(core.vocab_size, args.requests, args.seed, args.fixed_len)
    systems = args.systems.split(",")
    hf = None
    if "hf" in systems:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(core.engine.manifest["source"]["path"], dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None
    results: list[Result] = []
    profiler = cProfile.Profile() if args.profile else None
    warm = Workload("warmup", workloads[0].prompts[:2], [4, 4])
    run_engine(core, warm, 2)
    if hf is not None:
        run_hf(hf, warm, 2, core.engine.pad_token_id or 0)
    print(f"{'workload':<16}{'conc':>5}{'trtserve tok/s':>16}{'hf tok/s':>12}{'ratio':>8}")
    for work in workloads:
        for c in levels:
            if profiler:
                profiler.enable()
            ours = run_engine(core, work, c) if "trtserve" in systems else None
            if profiler:
                profiler.disable()
            theirs = run_hf(hf, work, c, core.engine.pad_token_id or 0) if hf is not None else None
            results += [r for r in (ours, theirs) if r is not None]
            o = ours.output_tok_s if ours else float("nan")
            t = theirs.output_tok_s if theirs else float("nan")
            print(f"{work.name:<16}{c:>5}{o:>16.1f}{t:>12.1f}{o / t:>8.2f}", flush=True)
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu": platform.processor() or platform.machine(), "model": args.model, "requests": args.requests,
                "transformers": __import__("transformers").__version__}
        rows = [{**asdict(r), "output_tok_s": r.output_tok_s} for r in results]
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
