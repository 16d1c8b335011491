"""EngineCore: one step of in-flight batching (schedule -> execute -> sample -> update).

What it is for: the engine's door (`add_request`: one admission check, then one
`Request` record per request) and its loop (`step`), over the scheduler, the KV
cache manager, the executor and the sampler, turning each step into
`RequestOutput` deltas. Only one thread (`AsyncEngine`'s engine thread, the
core process's loop) calls it. With `EngineConfig.overlap` on, the forward and
sampling of each step run on a worker thread while `step` updates the previous
step and schedules and builds the next (runtime/core/overlap.py): `step` then
returns the outputs of the step before the one it launched. With `text_output=False` (the engine-core process) it
detokenizes nothing and applies only the token stop rules: its outputs carry
token ids and empty text, and the front end makes the text and matches stop
strings (runtime/core/output_text.py).
Not for: asyncio or wire formats.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.config import EngineConfig
from runtime.core.admission import AdmissionLimits, check_request
from runtime.core.kv_cache import KVCacheManager, KVCacheStats
from runtime.core.output_text import OutputText
from runtime.core.overlap import (InFlightStep, OverlapWorker, needs_synchronous_step, overlap_enabled,
                                  run_step, updated_event)
from runtime.core.request import EngineRequest, Request, RequestStatus
from runtime.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from runtime.executor.executor import PyTorchExecutor
from runtime.executor.sampler import Sampler, SamplerOutput, TokenLogprobs, make_generator
from runtime.multimodal.processor import family_of
from runtime.outputs import RequestOutput, Usage
from runtime.sampling_params import SamplingParams
from runtime.structured.grammars import GrammarCache
from runtime.vision.encoder_cache import EncoderCacheStats

__all__ = ["EngineCore", "EngineRequest", "EngineStats", "collect_text"]

LOG = logging.getLogger(__name__)
STEP_ERROR_MESSAGE = "internal error while running the model; the request was not completed"


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv: KVCacheStats
    num_steps: int
    num_generated_tokens: int
    num_computed_prompt_tokens: int
    num_preemptions: int
    encoder: EncoderCacheStats | None = None       # VL engines: vision encoder cache and calls


class EngineCore:
    def __init__(self, engine: LoadedEngine, config: EngineConfig | None = None, text_output: bool = True) -> None:
        from transformers import AutoTokenizer

        self.text_output = text_output      # False: token ids only (the front end makes the text)
        self.config = (config or EngineConfig()).validate()
        self.executor = PyTorchExecutor(engine, self.config)
        # the executor holds the weights in its own layouts: keep the engine's description, not its tensors
        self.engine = replace(engine, weights={})
        layout = self.executor.layout
        build = engine.build
        self.scheduler_config = SchedulerConfig(
            max_batch_size=self.config.max_batch_size or build.max_batch_size,
            max_num_tokens=self.config.max_num_tokens or build.max_num_tokens,
            max_seq_len=build.max_seq_len, capacity_policy=self.config.capacity_policy,
            enable_chunked_prefill=self.config.enable_chunked_prefill)
        self.kv_cache = KVCacheManager(layout.num_kv_blocks, layout.tokens_per_block,
                                       self.config.enable_prefix_caching and build.kv_cache_reuse)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_cache)
        self.sampler = Sampler(torch.Generator(layout.device).manual_seed(self.config.seed))
        self.tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))
        self.vocab_size = engine.llm_config.vocab_size
        # structured output: compiled grammars, shared with the network face (which compiles before admission)
        self.grammars = GrammarCache(self.tokenizer, self.vocab_size, engine.eos_token_ids)
        self.limits = AdmissionLimits(self.vocab_size, build.max_input_len, build.max_seq_len,
                                      layout.num_kv_blocks, layout.tokens_per_block, family_of(engine),
                                      engine.eos_token_ids)
        self._num_steps = 0
        self._num_generated_tokens = 0
        self._num_computed_prompt_tokens = 0
        self._num_preemptions = 0
        # overlap: the worker thread and the step it runs whose tokens are not yet taken
        self._worker = OverlapWorker() if overlap_enabled(self.config.overlap, layout.device) else None
        self._in_flight: InFlightStep | None = None
        # called with each non-empty plan before its forward, on this thread (the core process's thread policy)
        self.before_forward: Callable[[SchedulerOutput], None] | None = None

    @classmethod
    def from_dir(cls, path: str | Path, config: EngineConfig | None = None, text_output: bool = True) -> EngineCore:
        return cls(load_engine(path), config, text_output)

    # ------------------------------------------------------------- requests

    def add_request(self, engine_request: EngineRequest) -> None:
        """The engine's door: admit a request, or raise a FieldError naming the field, changing nothing."""
        params = check_request(engine_request, self.limits, self.scheduler.has_request)
        self.scheduler.add_request(self._new_request(engine_request, params))

    def _new_request(self, engine_request: EngineRequest, params: SamplingParams) -> Request:
        """The engine's one record of an admitted request, with its output state."""
        ids = list(engine_request.prompt_token_ids)
        eos_ids = self.engine.eos_token_ids
        generator = None if params.seed is None else make_generator(params.seed, self.executor.layout.device)
        guide = params.guided_decoding       # compiled before admission by the service; else compiled here
        grammar = None if guide is None else self.grammars.matcher(guide)
        text = (OutputText.of(self.tokenizer, ids, params, eos_ids) if self.text_output
                else OutputText.tokens_only(params, eos_ids))
        return Request(engine_request.request_id, ids, params, eos_ids, engine_request.cache_salt,
                       engine_request.multimodal, generator, text, grammar)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request as aborted; returns its final output, or None if unknown."""
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            return None
        return _output(request, _output_text(request).flush(), (), (), RequestStatus.FINISHED_ABORTED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self._in_flight is not None

    @property
    def overlap(self) -> bool:
        """Whether steps run overlapped (EngineConfig.overlap resolved for the device)."""
        return self._worker is not None

    # ----------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        """Schedule, execute, sample, update; one output per request that got a token or failed.

        Overlapped: launch this step, then update the previous one; the outputs are the previous step's.
        """
        plan = self.scheduler.schedule()
        self._num_preemptions += len(plan.preempted_request_ids)
        previous, self._in_flight = self._in_flight, None
        if plan.is_empty:
            return self._take(previous)
        self._num_steps += 1
        if self.before_forward is not None:
            self.before_forward(plan)
        if self._worker is None:        # overlap off: the plain synchronous step
            try:
                logits = self.executor.execute(plan)
                sampled = self.sampler.sample(logits, plan.sampling_requests)
            except Exception:  # a failing step fails its requests, not the engine
                LOG.exception("step failed; failing its %d requests", len(plan.scheduled))
                return self._fail(plan)
            return self._update(plan, sampled)
        try:
            batch = self.executor.prepare(plan, previous.sampling_rows if previous is not None else None)
        except Exception:
            LOG.exception("building a step failed; failing its %d requests", len(plan.scheduled))
            return self._take(previous) + self._fail(plan)
        if not needs_synchronous_step(plan):
            self._in_flight = self._worker.submit(self.executor, self.sampler, batch,
                                                  self.scheduler.commit_ahead(plan), previous)
            return self._take(previous)
        outputs = self._take(previous)          # synchronous fallback: the previous step first, then this one
        try:
            result = run_step(self.executor, self.sampler, batch, plan.sampling_requests,
                              previous.result if previous is not None else None, updated_event())
        except Exception:
            LOG.exception("step failed; failing its %d requests", len(plan.scheduled))
            return outputs + self._fail(plan)
        return outputs + self._update(plan, result.sampled)

    def _take(self, step: InFlightStep | None) -> list[RequestOutput]:
        """Wait for a step in flight and update it; then the step after it may sample."""
        if step is None:
            return []
        try:
            try:
                result = step.result.result()
            except Exception:  # a failing step fails its requests, not the engine
                LOG.exception("step failed; failing its %d requests", len(step.plan.scheduled))
                return self._fail(step.plan)
            return self._update(step.plan, result.sampled)
        finally:
            step.updated.set()

    def _update(self, plan: SchedulerOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        """Advance the scheduled requests and turn each new token into an output delta."""
        self._num_computed_prompt_tokens += plan.num_prompt_tokens
        sampling_requests = plan.sampling_requests
        token_ids = dict(zip([request.request_id for request in sampling_requests], sampled.sampled_token_ids))
        updated = self.scheduler.update_from_output(plan, token_ids)
        self._num_generated_tokens += len(updated)
        if not any(sampled.logprobs):
            return [self._on_token(request, ()) for request in updated]
        rows = {request.request_id: row for row, request in enumerate(sampling_requests)}
        return [self._on_token(request, _as_tuple(sampled.logprobs[rows[request.request_id]])) for request in updated]

    def _on_token(self, request: Request, logprobs: tuple[TokenLogprobs, ...]) -> RequestOutput:
        """The text delta of the request's newest token and the stop decision it brings."""
        token_id = request.output_token_ids[-1]
        emit_text, finish, stop_reason = _output_text(request).on_token(token_id, len(request.output_token_ids))
        if finish is not None:
            self.scheduler.finish_request(request.request_id, finish)
        return _output(request, emit_text, (token_id,), logprobs, finish, stop_reason)

    def _fail(self, plan: SchedulerOutput) -> list[RequestOutput]:
        outputs = []
        for item in plan.scheduled:
            request = self.scheduler.finish_request(item.request.request_id, RequestStatus.FINISHED_ERROR)
            if request is not None:
                outputs.append(_output(request, _output_text(request).flush(), (), (),
                                       RequestStatus.FINISHED_ERROR, error=STEP_ERROR_MESSAGE))
        return outputs

    # ---------------------------------------------------------------- stats

    def stats(self) -> EngineStats:
        return EngineStats(self.scheduler.num_running, self.scheduler.num_waiting, self.kv_cache.stats(),
                           self._num_steps, self._num_generated_tokens, self._num_computed_prompt_tokens,
                           self._num_preemptions, self.executor.encoder_stats())

    def generate_all(self, requests: list[EngineRequest], max_steps: int = 1_000_000) -> dict[str, list[RequestOutput]]:
        """Run requests to completion synchronously (tests, offline tools); outputs per request id."""
        for request in requests:
            self.add_request(request)
        results: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        for _ in range(max_steps):
            if not self.has_unfinished():
                return results
            for out in self.step():
                results[out.request_id].append(out)
        raise RuntimeError(f"requests did not finish within {max_steps} steps")


def _output_text(request: Request) -> OutputText:
    assert request.output_text is not None, "set at admission"
    return request.output_text


def _as_tuple(logprobs: TokenLogprobs | None) -> tuple[TokenLogprobs, ...]:
    return () if logprobs is None else (logprobs,)


def _output(request: Request, text: str, token_ids: tuple[int, ...], logprobs: tuple[TokenLogprobs, ...],
            finish: RequestStatus | None = None, stop_reason: int | str | None = None,
            error: str | None = None) -> RequestOutput:
    """One delta of the request's output; `finish` set: its last one."""
    return RequestOutput(request.request_id, text, token_ids, finish is not None,
                         None if finish is None else finish.value, _usage(request), stop_reason, logprobs, error)


def _usage(request: Request) -> Usage:
    arrival, first_token, first_scheduled = request.arrival_time, request.first_token_time, request.first_scheduled_time
    return Usage(len(request.prompt_token_ids), len(request.output_token_ids), request.num_cached_tokens,
                 None if first_token is None else first_token - arrival, request.num_preemptions,
                 None if first_scheduled is None else first_scheduled - arrival)


def collect_text(outputs: list[RequestOutput]) -> tuple[str, list[int]]:
    """Concatenate a request's deltas."""
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids]
