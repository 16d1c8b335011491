"""The HF transformers baseline: the engine's source weights, run in this process with static batches.

What it is for: `generate_static_batch` (left-padded batch, greedy, every
request run to the batch's longest output length, EOS off; a streamer records
when the batch's first generated token exists), shared with
benchmarks/offline_throughput.py; and `HFBaseline`, which runs a benchmark
level as static batches of c sessions and reports `RequestRecord`s with the
same meaning as the server's: a request is sent when its batch starts, its
first token comes with the batch's first step, and it completes when
`generate` returns (a static batch hands back every request at once).
Not for: parity checks (tests and builder/validate.py compare numerics).
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.backends import BenchRequest, RequestRecord
from bench.hf_images import ImagePromptError, ImagePrompts, VisionBatch, image_prompts_for
from bench.loadgen import LevelRun, next_request
from bench.workloads import Session

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TTFT_METHOD = ("a generation streamer's first call after the prompt: the time the batch's first "
               "generated token exists (prefill of the whole static batch)")


class BaselineError(RuntimeError):
    """The baseline cannot run this workload or find its weights; the message says why."""


@dataclass(frozen=True, slots=True)
class BatchTiming:
    start_s: float
    first_token_s: float
    end_s: float
    output_ids: list[list[int]]          # each request's own output: its first output_len tokens


class _FirstTokenClock:
    """A transformers streamer: `put` is called with the prompt, then with each step's new tokens."""

    def __init__(self) -> None:
        self.num_puts = 0
        self.first_token_s: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.num_puts += 1
        if self.num_puts == 2:
            self.first_token_s = time.perf_counter()

    def end(self) -> None:
        pass


@torch.inference_mode()
def generate_static_batch(model: torch.nn.Module, prompts: Sequence[Sequence[int]], output_lens: Sequence[int],
                          pad_id: int, vision: VisionBatch | None = None) -> BatchTiming:
    """One static batch: left-padded, greedy, max(output_lens) new tokens for every row (EOS is ignored)."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    num_new = max(output_lens)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    extra: dict[str, torch.Tensor] = {}
    if vision is not None:
        extra = {name: t.to(device) for name, t in vision.tensors.items()}
        if vision.image_token_id is not None:     # Qwen2-VL needs mm_token_type_ids (REFERENCE.md section 4)
            extra["mm_token_type_ids"] = (ids == vision.image_token_id).long()
    clock = _FirstTokenClock()
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=num_new, min_new_tokens=num_new,
                         do_sample=False, pad_token_id=pad_id, streamer=clock, **extra)
    if out.shape[1] != width + num_new:
        raise BaselineError(f"HF generate returned {out.shape[1] - width} new tokens, asked for {num_new}")
    rows = out[:, width:].tolist()
    end = time.perf_counter()
    return BatchTiming(start, clock.first_token_s or end, end, [row[:n] for row, n in zip(rows, output_lens)])


def engine_source(engine_dir: Path) -> tuple[str, str]:
    """(HF checkpoint path or hub id, build dtype) from an engine's manifest."""
    manifest_path = engine_dir / "engine.json"
    if not manifest_path.is_file():
        raise BaselineError(f"{engine_dir}: no engine.json; give --engine an engine directory")
    manifest = json.loads(manifest_path.read_text())
    source = manifest.get("source", {})
    where = source.get("path") or source.get("hub_id")
    if not where:
        raise BaselineError(f"{manifest_path}: 'source' names neither a path nor a hub id")
    is_gguf = source.get("kind") == "gguf" and Path(where).is_file()
    if source.get("path") and not Path(where).is_dir() and not is_gguf:
        raise BaselineError(f"{manifest_path}: source checkpoint {where} is gone (rebuild the engine to "
                            "recreate a random-weight preset's checkpoint)")
    return where, manifest.get("build", {}).get("dtype", "fp32")


class HFBaseline:
    system = "hf-transformers"

    def __init__(self, engine_dir: Path, device: str) -> None:
        import transformers

        source, dtype = engine_source(engine_dir)
        self.source = source
        self.dtype = dtype if dtype in DTYPES else "fp32"
        self.device = device
        if source.endswith(".gguf"):      # a GGUF build: transformers' own GGUF loader, as validation uses
            gguf = Path(source)
            has_vision = False
            self.model = transformers.AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=DTYPES[self.dtype]).to(device).eval()
        else:
            config = transformers.AutoConfig.from_pretrained(source)
            has_vision = hasattr(config, "vision_config")
            model_class = (transformers.AutoModelForImageTextToText if has_vision
                           else transformers.AutoModelForCausalLM)
            self.model = model_class.from_pretrained(source, dtype=DTYPES[self.dtype]).to(device).eval()
        self.model.generation_config.eos_token_id = None      # fixed lengths: never stop early
        self.tokenizer = tokenizer = transformers.AutoTokenizer.from_pretrained(str(engine_dir / "tokenizer"))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad or 0)
        self.images: ImagePrompts | None = None
        if has_vision:
            try:
                self.images = image_prompts_for(source, config, tokenizer, engine_dir / "tokenizer")
            except ImagePromptError as e:
                raise BaselineError(str(e)) from e

    def describe(self) -> dict[str, object]:
        import transformers

        return {"system": self.system, "source": self.source, "dtype": self.dtype, "device": self.device,
                "transformers": transformers.__version__, "batching": "static batches of c sessions, left-padded",
                "ttft": TTFT_METHOD, "e2e": "batch start -> generate returns",
                "prompt_tokens": "prompt ids given to generate", "output_tokens": "each request's own output_len "
                "(tokens a static batch runs past it are waste, not output)"}

    def run_level(self, sessions: list[Session], run: LevelRun,
                  on_record: Callable[[RequestRecord], None] | None = None) -> LevelRun:
        if self.images is None and any(turn.images for s in sessions for turn in s.turns):
            raise BaselineError(f"{self.source} is a text-only model; the workload has images")
        try:
            for first in range(0, len(sessions), run.concurrency):
                self._run_batch(sessions[first:first + run.concurrency], run, on_record)
        except BaseException:
            run.partial = True
            raise
        return run

    def _run_batch(self, batch: list[Session], run: LevelRun,
                   on_record: Callable[[RequestRecord], None] | None) -> None:
        """Turn t of every session in the batch together; a turn resends the history as the server's would."""
        histories: list[tuple[BenchRequest, RequestRecord] | None] = [None] * len(batch)
        for t in range(max(len(s.turns) for s in batch)):
            active = [i for i, s in enumerate(batch) if t < len(s.turns)]
            requests = [next_request(histories[i], batch[i].turns[t]) for i in active]
            prompts: list[Sequence[int]] = [r.token_ids for r in requests]
            vision = None
            if self.images is not None and any(r.images for r in requests):
                prompts, vision = self.images.batch(requests)
            timing = generate_static_batch(self.model, prompts, [r.output_len for r in requests], self.pad_id,
                                           vision)
            for i, request, prompt, output_ids in zip(active, requests, prompts, timing.output_ids):
                record = RequestRecord(timing.start_s, timing.end_s, timing.first_token_s,
                                       prompt_tokens=len(prompt), output_tokens=len(output_ids),
                                       output_ids=output_ids)
                if self.images is not None:   # a next turn resends history as text; the server skips special tokens
                    record.output_text = self.tokenizer.decode(output_ids, skip_special_tokens=True)
                run.records.append(record)
                histories[i] = (request, record)
                if on_record is not None:
                    on_record(record)
