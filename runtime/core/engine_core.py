"""EngineCore: one step of in-flight batching (schedule -> execute -> sample -> update).

What it is for: owning the scheduler, the KV cache manager, the executor and
per-request output state (sampler state, detokenizer, stop checker), and
turning each step into `RequestOutput` deltas. Synchronous and single-threaded:
`AsyncEngine` runs it on its one engine thread.
Not for: threads, asyncio or wire formats.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.config import EngineConfig
from runtime.core.detokenizer import IncrementalDetokenizer
from runtime.vision.encoder_cache import EncoderCacheStats
from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.executor.executor import PyTorchExecutor
from runtime.core.kv_cache import KVCacheManager, KVCacheStats
from runtime.multimodal.processor import MultimodalInputs, check_multimodal, mrope_spec_of
from runtime.outputs import RequestOutput, Usage
from runtime.core.request import Request, RequestStatus
from runtime.executor.sampler import Sampler, SamplingState, TokenLogprobs
from runtime.sampling_params import SamplingParams
from runtime.core.scheduler import RequestRejectedError, Scheduler, SchedulerConfig, SchedulerOutput
from runtime.core.stop_checker import StopChecker

LOG = logging.getLogger(__name__)
STEP_ERROR_MESSAGE = "internal error while running the model; the request was not completed"


@dataclass(frozen=True, slots=True)
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    cache_salt: str | None = None
    multimodal: MultimodalInputs | None = None     # images / videos of the prompt (VL engines)


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


@dataclass(slots=True)
class _RequestState:
    request: Request
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    stop: StopChecker


class EngineCore:
    def __init__(self, engine: LoadedEngine, config: EngineConfig | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = (config or EngineConfig()).validate()
        self.engine = engine
        self.executor = PyTorchExecutor(engine, self.config)
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
        self.mrope_spec = mrope_spec_of(engine)
        self._states: dict[str, _RequestState] = {}
        self._num_steps = 0
        self._num_generated_tokens = 0
        self._num_computed_prompt_tokens = 0
        self._num_preemptions = 0

    @classmethod
    def from_dir(cls, path: str | Path, config: EngineConfig | None = None) -> EngineCore:
        return cls(load_engine(path), config)

    # ------------------------------------------------------------- requests

    def add_request(self, engine_request: EngineRequest) -> None:
        """Admit a request or raise a typed ValueError (field named) without changing anything."""
        params = engine_request.sampling_params.validate(self.vocab_size)
        ids = list(engine_request.prompt_token_ids)
        if len(ids) > self.engine.build.max_input_len:
            raise RequestRejectedError("prompt_token_ids", f"prompt ({len(ids)} tokens) exceeds max_input_len "
                                       f"({self.engine.build.max_input_len})")
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestRejectedError("prompt_token_ids", f"token id {bad!r} is outside the vocabulary "
                                       f"[0, {self.vocab_size})")
        mm = engine_request.multimodal
        check_multimodal(ids, mm, self.mrope_spec)
        request = Request(engine_request.request_id, ids, params, self.engine.eos_token_ids,
                          cache_salt=engine_request.cache_salt, mm_spans=mm.spans if mm else (), multimodal=mm)
        self.scheduler.add_request(request)
        self._states[request.request_id] = _RequestState(
            request, SamplingState.from_request(request, self.executor.layout.device),
            IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens),
            StopChecker(params, self.engine.eos_token_ids))

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request as aborted; returns its final output, or None if unknown."""
        state = self._states.get(request_id)
        if state is None or not self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED):
            return None
        return self._finish(state, RequestStatus.FINISHED_ABORTED, state.stop.flush(), (), ())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ----------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        output = self.scheduler.schedule()
        self._num_preemptions += len(output.preempted_request_ids)
        if output.is_empty:
            return []
        self._num_steps += 1
        sampling = [s for s in output.scheduled if s.samples]
        try:
            logits = self.executor.execute(output)
            sampled = self.sampler.sample(logits, [self._states[s.request.request_id].sampling for s in sampling])
        except Exception:  # a failing step fails its requests, not the engine
            LOG.exception("step failed; failing its %d requests", len(output.scheduled))
            return self._fail_step(output)
        by_id = {s.request.request_id: i for i, s in enumerate(sampling)}
        self._num_computed_prompt_tokens += sum(
            max(0, min(s.num_computed_tokens + s.num_new_tokens, s.request.num_prompt_tokens) - s.num_computed_tokens)
            for s in output.scheduled)
        token_map = {rid: sampled.sampled_token_ids[i] for rid, i in by_id.items()}
        outputs = []
        for request in self.scheduler.update_from_output(output, token_map):
            index = by_id[request.request_id]
            outputs.append(self._on_token(request, sampled.logprobs[index]))
        return outputs

    def _on_token(self, request: Request, logprobs: TokenLogprobs | None) -> RequestOutput:
        state = self._states[request.request_id]
        token_id = request.output_token_ids[-1]
        self._num_generated_tokens += 1
        delta = state.detokenizer.add_tokens([token_id])
        decision = state.stop.update(token_id, request.num_output_tokens, delta, state.detokenizer.flush)
        lps = (logprobs,) if logprobs is not None else ()
        if decision.finish is None:
            return RequestOutput(request.request_id, decision.emit_text, (token_id,), False, None,
                                 self._usage(request), logprobs=lps)
        self.scheduler.finish_request(request.request_id, decision.finish)
        return self._finish(state, decision.finish, decision.emit_text, (token_id,), lps, decision.stop_reason)

    def _fail_step(self, output: SchedulerOutput) -> list[RequestOutput]:
        outputs = []
        for item in output.scheduled:
            rid = item.request.request_id
            if self.scheduler.finish_request(rid, RequestStatus.FINISHED_ERROR):
                state = self._states[rid]
                outputs.append(self._finish(state, RequestStatus.FINISHED_ERROR, state.stop.flush(), (), (),
                                            error=STEP_ERROR_MESSAGE))
        return outputs

    def _finish(self, state: _RequestState, status: RequestStatus, text: str, token_ids: tuple[int, ...],
                logprobs: tuple[TokenLogprobs, ...], stop_reason: int | str | None = None,
                error: str | None = None) -> RequestOutput:
        request = state.request
        self._states.pop(request.request_id, None)
        return RequestOutput(request.request_id, text, token_ids, True, status.value, self._usage(request),
                             stop_reason, logprobs, error)

    @staticmethod
    def _usage(request: Request) -> Usage:
        def since_arrival(t: float | None) -> float | None:
            return None if t is None else t - request.arrival_time

        return Usage(request.num_prompt_tokens, request.num_output_tokens, request.num_cached_tokens,
                     since_arrival(request.first_token_time), request.num_preemptions,
                     since_arrival(request.first_scheduled_time))

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


def collect_text(outputs: list[RequestOutput]) -> tuple[str, list[int]]:
    """Concatenate a request's deltas."""
    return "".join(o.text for o in outputs), [t for o in outputs for t in o.token_ids]


