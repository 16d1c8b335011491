"""Host overhead of the in-process engine: tok/s and microseconds of host time per generated token.

tiny-qwen2 (2 layers, 64 wide: the model's arithmetic is negligible, so what is
measured is the engine's own host work) at batch 1, 16 and the build's maximum:
each level runs `--waves` waves of `batch` requests together (32 prompt tokens,
128 output tokens, greedy, EOS ignored) and splits the wall time of every step into

* forward: `DecoderModel.forward` (per-op Python, the attention op, the GEMMs);
* batch building: the rest of `PyTorchExecutor.execute` (packing the scheduled
  chunks into a ForwardBatch, vision lookups);
* scheduling+sampling: `Scheduler.schedule`, `Sampler.sample` and
  `Scheduler.update_from_output`;
* detokenization: the rest of the step's update (incremental detokenizer, stop
  checks, output records).

`--token-ids-only` runs the step as the engine-core process of the server runs it
(EngineCore text_output=False: token stop rules only, no detokenization or stop
strings, which the server's front end does), so "detokenization" is then only the
token stop rules and the output records.

`--overlap off,on --repeats 3` runs each level with overlap scheduling off and on
(runtime/core/overlap.py), alternating, on one core per mode: with overlap on the
forward and sampling run on the worker thread beside the engine thread, so the
parts overlap in time: forward and scheduling+sampling are still each call's own
time, batch building is `PyTorchExecutor.prepare`, and detokenization is not
separable (nan); compare tok/s.

Timers wrap the engine's own objects from the outside (the engine carries no
timing code); their overhead (one perf_counter pair per call) is included.
`--baseline hf` also runs HF `generate` on the same weights in static batches of
the same size (the ratio the issue's targets use). Numbers are only meaningful on
a quiet machine (docs/perf/README.md).

    python benchmarks/host_overhead.py                     # tiny-qwen2, batch 1,16,max
    python benchmarks/host_overhead.py --baseline hf --json host_overhead.json
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from builder.pipeline import BuildRequest, build_engine
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest
from runtime.sampling_params import SamplingParams

_F = TypeVar("_F", bound=Callable[..., object])
PARTS = ("forward", "batch_building", "scheduling_sampling", "detokenization")


@dataclass(slots=True)
class Clock:
    """Seconds spent inside each wrapped call, by name."""

    seconds: dict[str, float] = field(default_factory=dict)

    def wrap(self, name: str, fn: _F) -> _F:
        def timed(*args: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed  # type: ignore[return-value]

    def get(self, name: str) -> float:
        return self.seconds.get(name, 0.0)


@dataclass(frozen=True, slots=True)
class LevelResult:
    batch: int
    output_tokens: int
    seconds: float
    us_per_token: dict[str, float]

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.seconds


def instrument(core: EngineCore) -> Clock:
    """Wrap the step's parts on this engine's objects (instance attributes shadow the methods)."""
    clock = Clock()
    core.scheduler.schedule = clock.wrap("schedule", core.scheduler.schedule)  # type: ignore[method-assign]
    core.scheduler.update_from_output = clock.wrap(  # type: ignore[method-assign]
        "update_from_output", core.scheduler.update_from_output)
    core.sampler.sample = clock.wrap("sample", core.sampler.sample)  # type: ignore[method-assign]
    core.executor.execute = clock.wrap("execute", core.executor.execute)  # type: ignore[method-assign]
    core.executor.prepare = clock.wrap("prepare", core.executor.prepare)  # type: ignore[method-assign]
    core.executor.model.forward = clock.wrap("forward", core.executor.model.forward)  # type: ignore[method-assign]
    core.step = clock.wrap("step", core.step)  # type: ignore[method-assign]
    return clock


def split(clock: Clock, overlap: bool = False) -> dict[str, float]:
    """Seconds per part (PARTS), from the wrapped calls."""
    scheduling = clock.get("schedule") + clock.get("sample") + clock.get("update_from_output")
    if overlap:                 # the forward and sampling run beside the rest (module docstring)
        return {"forward": clock.get("forward"), "batch_building": clock.get("prepare"),
                "scheduling_sampling": scheduling, "detokenization": float("nan")}
    rest = clock.get("step") - clock.get("execute") - scheduling
    return {"forward": clock.get("forward"), "batch_building": clock.get("execute") - clock.get("forward"),
            "scheduling_sampling": scheduling, "detokenization": rest}


def run_level(core: EngineCore, clock: Clock, prompts: list[list[int]], batch: int, output_len: int,
              waves: int) -> LevelResult:
    clock.seconds.clear()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    produced = 0
    start = time.perf_counter()
    for wave in range(waves):
        requests = [EngineRequest(f"b{batch}-w{wave}-{i}", prompts[(wave * batch + i) % len(prompts)], params)
                    for i in range(batch)]
        for outputs in core.generate_all(requests).values():
            produced += sum(len(o.token_ids) for o in outputs)
    seconds = time.perf_counter() - start
    per_token = {part: s / produced * 1e6 for part, s in split(clock, core.overlap).items()}
    per_token["host_total"] = sum(v for k, v in per_token.items() if k != "forward")
    return LevelResult(batch, produced, seconds, per_token)


def run_hf(engine_dir: Path, prompts: list[list[int]], batch: int, output_len: int, waves: int,
           pad_id: int) -> float:
    from bench.baseline import generate_static_batch
    from transformers import AutoModelForCausalLM

    source = json.loads((engine_dir / "engine.json").read_text())["source"]["path"]
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    generate_static_batch(model, prompts[:batch], [4] * batch, pad_id)          # warm-up
    start = time.perf_counter()
    produced = 0
    for wave in range(waves):
        chunk = [prompts[(wave * batch + i) % len(prompts)] for i in range(batch)]
        produced += sum(len(ids) for ids in generate_static_batch(model, chunk, [output_len] * batch,
                                                                  pad_id).output_ids)
    return produced / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2")
    parser.add_argument("--engine-dir", type=Path, default=None,
                        help="an engine to run as it is (default: --model built into engines/<model>-fp32)")
    parser.add_argument("--batch", default="1,16,max", help="batch sizes; 'max' is the build's max_batch_size")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--waves", type=int, default=2, help="waves of `batch` requests per level")
    parser.add_argument("--op-backend", default="auto", help="EngineConfig.op_backend (auto, reference, cpu)")
    parser.add_argument("--baseline", choices=("none", "hf"), default="none")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--token-ids-only", action="store_true",
                        help="the step as the engine-core process runs it: no text (the front end makes it)")
    parser.add_argument("--overlap", default="off",
                        help="EngineConfig.overlap: off, on, or a list (off,on) run alternately, one core each")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every level and overlap mode")
    args = parser.parse_args()
    engine_dir = args.engine_dir
    if engine_dir is None:      # a given engine is served as it is (building --model there would overwrite it)
        engine_dir = Path("engines") / f"{args.model}-fp32"
        build_engine(BuildRequest(model=args.model, output=engine_dir, dtype="fp32", validate=False))
    modes = args.overlap.split(",")
    cores = {mode: EngineCore.from_dir(engine_dir, EngineConfig(device="cpu", op_backend=args.op_backend,
                                                                overlap=mode), text_output=not args.token_ids_only)
             for mode in modes}
    core = cores[modes[0]]
    max_batch = core.scheduler_config.max_batch_size
    levels = list(dict.fromkeys(max_batch if b == "max" else int(b) for b in args.batch.split(",")))
    rng = random.Random(0)
    prompts = [[rng.randrange(core.vocab_size - 16) for _ in range(args.input_len)] for _ in range(4 * max(levels))]
    clocks = {mode: instrument(c) for mode, c in cores.items()}
    for mode, c in cores.items():
        run_level(c, clocks[mode], prompts, 2, 8, 1)                                 # warm-up (kernel compile)
    header = (f"{'overlap':>8}{'batch':>6}{'tok/s':>10}{'hf tok/s':>10}{'ratio':>7}"
              + "".join(f"{p:>21}" for p in PARTS))
    print(f"{engine_dir.name}, {args.input_len} in / {args.output_len} out, "
          f"op backend {core.executor.model.ops.name}; us of wall time per generated token:")
    print(header + f"{'host (all but fwd)':>20}")
    rows = []
    for batch, _, mode in ((b, r, m) for b in levels for r in range(args.repeats) for m in modes):
        result = run_level(cores[mode], clocks[mode], prompts, batch, args.output_len, args.waves)
        hf = (run_hf(engine_dir, prompts, batch, args.output_len, args.waves, core.engine.pad_token_id or 0)
              if args.baseline == "hf" else float("nan"))
        us = result.us_per_token
        print(f"{mode:>8}{batch:>6}{result.tok_s:>10.0f}{hf:>10.0f}{result.tok_s / hf:>7.2f}"
              + "".join(f"{us[p]:>21.1f}" for p in PARTS) + f"{us['host_total']:>20.1f}", flush=True)
        rows.append({**asdict(result), "overlap": mode, "tok_s": result.tok_s, "hf_tok_s": hf})
    if args.json:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
                "model": args.model, "engine": str(engine_dir), "input_len": args.input_len,
                "output_len": args.output_len,
                "waves": args.waves, "op_backend": core.executor.model.ops.name, "text_output": core.text_output}
        args.json.write_text(json.dumps({"meta": meta, "levels": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
