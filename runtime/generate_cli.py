"""`trtserve-generate`: offline generation from an engine directory.

One prompt streams its text to the terminal as it is generated; several
prompts (repeated --prompt, or --prompts-file with one prompt per line) run
together through in-flight batching, `--concurrency` at a time, and print as
they finish.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import torch

from runtime.core.async_engine import AsyncEngine
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest
from engine_format.errors import EngineLoadError
from runtime.engine_args import add_engine_gpu_arguments
from runtime.executor.kv_sizing import layout_report
from runtime.sampling_params import SamplingParams, SamplingParamsError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trtserve-generate", description=__doc__)
    p.add_argument("--engine", required=True, type=Path, help="engine directory built by trtserve-build")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", type=Path, help="file with one prompt per line")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--device", default="auto")
    add_engine_gpu_arguments(p)
    return p.parse_args(argv)


def sampling_from_args(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty, seed=args.seed,
        stop=tuple(args.stop), ignore_eos=args.ignore_eos)


def encode(core: EngineCore, text: str, chat: bool) -> list[int]:
    if chat:
        return list(core.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    return list(core.tokenizer(text, add_special_tokens=False)["input_ids"])


async def run(core: EngineCore, prompts: list[str], args: argparse.Namespace) -> int:
    engine = AsyncEngine(core)
    params = sampling_from_args(args)
    stream = len(prompts) == 1
    gate = asyncio.Semaphore(max(1, args.concurrency))
    failures = 0

    async def one(index: int, text: str) -> None:
        nonlocal failures
        async with gate:
            pieces: list[str] = []
            try:
                async for out in engine.generate(EngineRequest(f"prompt-{index}", encode(core, text, args.chat), params)):
                    pieces.append(out.text)
                    if stream:
                        print(out.text, end="", flush=True)
            except ValueError as exc:
                failures += 1
                print(f"[{index}] error: {exc}", file=sys.stderr)
                return
            if stream:
                print(f"\n[finish: {out.finish_reason}; {out.usage.prompt_tokens} prompt + "
                      f"{out.usage.completion_tokens} generated tokens]")
            else:
                print(f"[{index}] {text!r} -> {''.join(pieces)!r} ({out.finish_reason})")

    start = time.monotonic()
    try:
        await asyncio.gather(*(one(i, t) for i, t in enumerate(prompts)))
    finally:
        engine.shutdown()
    stats = core.stats()
    elapsed = time.monotonic() - start
    print(f"{len(prompts)} requests, {stats.num_generated_tokens} tokens in {elapsed:.2f} s "
          f"({stats.num_generated_tokens / max(elapsed, 1e-9):.1f} tok/s), prefix hit rate {stats.kv.hit_rate:.2f}",
          file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += [line for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        print("trtserve-generate: error: give --prompt or --prompts-file", file=sys.stderr)
        return 2
    try:
        sampling_from_args(args).validate()
        config = EngineConfig.from_env(device=args.device, kv_cache_max_bytes=args.kv_cache_max_bytes,
                                       gpu_memory_fraction=args.gpu_memory_fraction, op_backend=args.op_backend,
                                       enable_cuda_graphs=False if args.no_cuda_graphs else None,
                                       overlap=args.overlap, cpu_threads=args.cpu_threads)
        if config.cpu_threads:      # the engine runs in this process
            torch.set_num_threads(config.cpu_threads)
        core = EngineCore.from_dir(args.engine, config)
        print(layout_report(core.executor.layout), file=sys.stderr)
    except (EngineLoadError, SamplingParamsError, ValueError) as exc:
        print(f"trtserve-generate: error: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(run(core, prompts, args))


if __name__ == "__main__":
    sys.exit(main())
