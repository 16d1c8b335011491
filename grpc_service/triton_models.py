"""The four Triton models of one engine: what each does with a request, as response parts.

What it is for: `TritonModel.infer(request)`, an async iterator of
`ResponsePart`s (output tensors plus a final flag), for the roles
`ensemble` (text in, text deltas out), `tensorrt_llm` (token ids in, token ids
out), `preprocessing` (text -> ids) and `postprocessing` (ids -> text). The
generating roles call `ServedModel.generate`, so leaving the iterator early
aborts the engine request; a streaming request yields one part per new chunk,
a non-streaming one a single part holding the whole output.
Not for: the RPC plumbing, stream multiplexing and cancellation by id
(triton_service.py), or reading tensors (triton_tensors / triton_params).
"""
from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb

from grpc_service.engine_host import ServedModel
from grpc_service.errors import InvalidArgument, RequestFailed
from grpc_service.triton_params import (
    ENSEMBLE_NAMES,
    TENSORRT_LLM_NAMES,
    TritonGeneration,
    decode_utf8,
    ensemble_request,
    scalar_int,
    tensor_error,
    tensorrt_llm_request,
)
from grpc_service.triton_schema import (
    ENSEMBLE,
    LOGITS_OUTPUT_NAMES,
    PERF_OUTPUT_NAMES,
    POSTPROCESSING,
    PREPROCESSING,
    TENSORRT_LLM,
    kserve_datatype,
)
from grpc_service.triton_stats import Execution, InferenceStats, RequestClock
from grpc_service.triton_tensors import OutputTensor, decode_inputs, requested_outputs
from runtime.outputs import RequestOutput

_T = TypeVar("_T")
API_LABEL = "kserve"
MAX_POSTPROCESS_BEAMS = 16          # sequences one postprocessing request may detokenize (each <= max_seq_len)
LOG_PROB_OUTPUTS = ("cum_log_probs", "output_log_probs")


@dataclass(frozen=True, slots=True)
class ResponsePart:
    outputs: list[OutputTensor]
    final: bool


@dataclass(slots=True)
class _Progress:
    """What a generating request has produced so far (for cumulative outputs and perf metrics)."""

    arrival_ns: int
    first_token_ns: int = 0
    num_tokens: int = 0
    cum_log_prob: float = 0.0
    last: RequestOutput | None = field(default=None, repr=False)


class TritonModel:
    def __init__(self, config: mc.ModelConfig, role: str, served: ServedModel) -> None:
        self.config = config
        self.name = config.name
        self.role = role
        self.served = served
        self.decoupled = config.model_transaction_policy.decoupled
        self.stats = InferenceStats()
        self.composing: dict[str, InferenceStats] = {}     # ensemble only: role -> that model's statistics
        self._dtypes = {spec.name: kserve_datatype(spec.data_type) for spec in config.output}

    @property
    def ready(self) -> bool:
        return self.served.ready

    async def infer(self, request: pb.ModelInferRequest, request_id: str,
                    clock: RequestClock) -> AsyncGenerator[ResponsePart, None]:
        """Decode, validate and run one request; `request_id` is the engine-side id (unique in flight).
        `clock` times it on this model (the caller adds response encoding and finishes it); an ensemble
        request also records its composing models' executions (triton_stats.py)."""
        arrays = decode_inputs(request, self.config)
        wanted = requested_outputs(request, self.config)
        clock.input_done()
        if self.role == PREPROCESSING:         # tokenizer work: on the model's tokenizer thread
            yield ResponsePart(self._select(await self.served.off_loop(self._preprocess, arrays), wanted, ()), True)
            return
        if self.role == POSTPROCESSING:
            yield ResponsePart(self._select(await self.served.off_loop(self._postprocess, arrays), wanted, ()), True)
            return
        if self.role == ENSEMBLE:
            generation, prompt_text = await self._preprocessing_step(ensemble_request(arrays, self.served))
        else:
            generation, prompt_text = tensorrt_llm_request(arrays, self.served), ""
        if generation.params.guided_decoding is not None:     # compiled off the loop, before admission
            await self.served.prepare_guide(generation.params.guided_decoding, "guided_decoding_guide")
        if generation.stream and not self.decoupled:
            name = "stream" if self.role == ENSEMBLE else "streaming"
            raise InvalidArgument(name, f"streaming needs a decoupled model; model {self.name!r} is not decoupled")
        defaults = (LOG_PROB_OUTPUTS if generation.return_log_probs else ()) + (
            tuple(PERF_OUTPUT_NAMES) if generation.return_perf_metrics else ())
        names: list[str] | None = None        # the same for every response of a request: chosen once
        async for outputs, final in self._generate(generation, prompt_text, request_id, clock):
            start_ns = time.monotonic_ns()
            if names is None:
                names = self._names(outputs, wanted, defaults)
            part = ResponsePart([OutputTensor(n, self._dtypes[n], outputs[n]) for n in names], final)
            if POSTPROCESSING in self.composing:       # the ensemble's postprocessing runs once per response
                self.composing[POSTPROCESSING].record_success(Execution.compute_only(time.monotonic_ns() - start_ns))
            yield part

    async def _preprocessing_step(self, work: Coroutine[Any, Any, _T]) -> _T:
        """An ensemble's tokenization, counted as one execution of its preprocessing model."""
        stats = self.composing.get(PREPROCESSING)
        start_ns = time.monotonic_ns()
        try:
            result = await work
        except BaseException:
            if stats is not None:
                stats.record_failure(time.monotonic_ns() - start_ns)
            raise
        if stats is not None:
            stats.record_success(Execution.compute_only(time.monotonic_ns() - start_ns))
        return result

    async def _generate(self, generation: TritonGeneration, prompt_text: str, request_id: str,
                        clock: RequestClock) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool], None]:
        # an ensemble request is one execution of its tensorrt_llm model, from admission to the last token
        llm_step = RequestClock(self.composing[TENSORRT_LLM]) if TENSORRT_LLM in self.composing else None
        engine_clock = llm_step if self.role == ENSEMBLE else clock
        try:
            async for item in self._generate_steps(generation, prompt_text, request_id, engine_clock, llm_step):
                yield item
        finally:
            if llm_step is not None:
                llm_step.finish(False)               # no-op when the last output already recorded it

    async def _generate_steps(self, generation: TritonGeneration, prompt_text: str, request_id: str,
                              engine_clock: RequestClock | None,
                              llm_step: RequestClock | None) -> AsyncGenerator[tuple[dict[str, np.ndarray], bool],
                                                                               None]:
        progress = _Progress(time.time_ns())
        text_parts: list[str] = [] if generation.exclude_input_in_output or generation.stream else [prompt_text]
        token_ids: list[int] = [] if generation.exclude_input_in_output or generation.stream else list(
            generation.prompt_ids)
        log_probs: list[float] = []
        stream = self.served.generate(generation.prompt_ids, generation.params, API_LABEL, request_id=request_id,
                                      multimodal=generation.multimodal)
        async with contextlib.aclosing(stream) as outputs, \
                contextlib.aclosing(_tensor_errors(outputs, self.role)) as named_outputs:
            async for out in named_outputs:
                if out.finish_reason == "error":
                    raise RequestFailed(out.error or "the engine failed the request")
                self._advance(progress, out)
                if out.finished:
                    if engine_clock is not None:
                        engine_clock.queued(_queue_ns(out))
                    if llm_step is not None:
                        llm_step.finish(True)
                text_parts.append(out.text)
                token_ids.extend(out.token_ids)
                log_probs.extend(lp.logprob for lp in out.logprobs)
                has_news = bool(out.text) if self.role == ENSEMBLE else bool(out.token_ids)
                if generation.stream and (has_news or out.finished):
                    yield self._outputs(progress, "".join(text_parts), token_ids, log_probs), out.finished
                    text_parts, token_ids, log_probs = [], [], []
                elif out.finished:
                    yield self._outputs(progress, "".join(text_parts), token_ids, log_probs), True

    @staticmethod
    def _advance(progress: _Progress, out: RequestOutput) -> None:
        if out.token_ids and not progress.first_token_ns:
            progress.first_token_ns = time.time_ns()
        progress.num_tokens += len(out.token_ids)
        progress.cum_log_prob += sum(lp.logprob for lp in out.logprobs)
        progress.last = out

    def _outputs(self, progress: _Progress, text: str, token_ids: list[int],
                 log_probs: list[float]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        if self.role == ENSEMBLE:
            out["text_output"] = _bytes_array([[text.encode("utf-8")]])
        else:
            out["output_ids"] = np.array([[token_ids]], dtype=np.int32).reshape(1, 1, len(token_ids))
            out["sequence_length"] = np.array([[len(token_ids)]], dtype=np.int32)
        out["cum_log_probs"] = np.array([[progress.cum_log_prob]], dtype=np.float32)
        out["output_log_probs"] = np.array(log_probs, dtype=np.float32).reshape(1, 1, len(log_probs))
        out["context_logits"] = np.zeros((1, 0, 0), dtype=np.float32)
        out["generation_logits"] = np.zeros((1, 0, 0, 0), dtype=np.float32)
        out["batch_index"] = np.zeros((1, 1), dtype=np.int32)
        out["sequence_index"] = np.zeros((1, 1), dtype=np.int32)
        out.update(self._perf(progress))
        return out

    def _perf(self, progress: _Progress) -> dict[str, np.ndarray]:
        block = self.served.limits.tokens_per_block
        usage = progress.last.usage if progress.last is not None else None
        reused = usage.cached_tokens // block if usage else 0
        total = math.ceil((usage.prompt_tokens + usage.completion_tokens) / block) if usage else 0
        now = time.time_ns()
        queued_ns = int(usage.time_in_queue_s * 1e9) if usage and usage.time_in_queue_s is not None else 0
        values = {"kv_cache_alloc_new_blocks": (max(total - reused, 0), np.int32),
                  "kv_cache_reused_blocks": (reused, np.int32), "kv_cache_alloc_total_blocks": (total, np.int32),
                  "arrival_time_ns": (progress.arrival_ns, np.int64),
                  "first_scheduled_time_ns": (progress.arrival_ns + queued_ns, np.int64),
                  "first_token_time_ns": (progress.first_token_ns, np.int64),
                  "last_token_time_ns": (now, np.int64), "acceptance_rate": (0.0, np.float32),
                  "total_accepted_draft_tokens": (0, np.int32), "total_draft_tokens": (0, np.int32)}
        return {name: np.array([[value]], dtype=dtype) for name, (value, dtype) in values.items()}

    def _select(self, produced: dict[str, np.ndarray], wanted: list[str],
                defaults: tuple[str, ...]) -> list[OutputTensor]:
        """The client's requested outputs, else the primary ones plus those its flags turned on."""
        return [OutputTensor(n, self._dtypes[n], produced[n]) for n in self._names(produced, wanted, defaults)]

    def _names(self, produced: dict[str, np.ndarray], wanted: list[str], defaults: tuple[str, ...]) -> list[str]:
        """`_select`'s output names, in order."""
        optional = LOG_PROB_OUTPUTS + tuple(PERF_OUTPUT_NAMES | LOGITS_OUTPUT_NAMES)
        names = wanted or [n for n in self._dtypes if n in produced and (n not in optional or n in defaults)]
        return [n for n in names if n in produced]

    # ------------------------------------------------------------ pre / post

    def _preprocess(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        served = self.served
        ids = served.encode_text(decode_utf8("QUERY", arrays["QUERY"].reshape(-1)[0]))
        words = {name: [list(w) for w in served.tokenize_words([decode_utf8(name, w) for w in arrays[name].reshape(-1)],
                                                                 name)]
                 if name in arrays else [] for name in ("BAD_WORDS_DICT", "STOP_WORDS_DICT")}
        end_id = scalar_int(arrays, "END_ID")
        pad_id = scalar_int(arrays, "PAD_ID")
        eos = served.limits.eos_token_ids[0] if served.limits.eos_token_ids else 0
        end_id = eos if end_id is None else end_id
        pad_id = (served.limits.pad_token_id if served.limits.pad_token_id is not None else end_id) \
            if pad_id is None else pad_id
        return {"INPUT_ID": np.array([ids], dtype=np.int32).reshape(1, len(ids)),
                "REQUEST_INPUT_LEN": np.array([[len(ids)]], dtype=np.int32),
                "BAD_WORDS_IDS": _word_list(words["BAD_WORDS_DICT"]),
                "STOP_WORDS_IDS": _word_list(words["STOP_WORDS_DICT"]),
                "REQUEST_OUTPUT_LEN": arrays["REQUEST_OUTPUT_LEN"].astype(np.int32).reshape(1, 1),
                "OUT_END_ID": np.array([[end_id]], dtype=np.int32),
                "OUT_PAD_ID": np.array([[pad_id]], dtype=np.int32)}

    def _postprocess(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tokens = arrays["TOKENS_BATCH"][0]            # [beams, n]
        if tokens.shape[0] > MAX_POSTPROCESS_BEAMS:
            raise InvalidArgument("TOKENS_BATCH", f"{tokens.shape[0]} beams exceed the limit of "
                                                  f"{MAX_POSTPROCESS_BEAMS}")
        lengths = arrays["SEQUENCE_LENGTH"].reshape(-1)
        if len(lengths) != tokens.shape[0]:
            raise InvalidArgument("SEQUENCE_LENGTH", f"holds {len(lengths)} lengths for {tokens.shape[0]} beams")
        texts = []
        for beam, length in enumerate(int(v) for v in lengths):
            if not 0 <= length <= tokens.shape[1]:
                raise InvalidArgument("SEQUENCE_LENGTH", f"entry {beam} must be in [0, {tokens.shape[1]}], "
                                                         f"got {length}")
            texts.append(self.served.decode([int(t) for t in tokens[beam][:length]], field="TOKENS_BATCH")
                         .encode("utf-8"))
        return {"OUTPUT": _bytes_array([texts])}


def _queue_ns(out: RequestOutput) -> int:
    """How long the engine kept the request waiting before its first step."""
    queued_s = out.usage.time_in_queue_s
    return int(queued_s * 1e9) if queued_s is not None else 0


async def _tensor_errors(outputs: AsyncGenerator[RequestOutput, None],
                         role: str) -> AsyncGenerator[RequestOutput, None]:
    """The engine's admission refusals, named after this role's tensors (prompt_token_ids -> text_input, ...)."""
    names = ENSEMBLE_NAMES if role == ENSEMBLE else TENSORRT_LLM_NAMES
    try:
        async for out in outputs:
            yield out
    except ValueError as exc:
        if not isinstance(getattr(exc, "field", None), str):
            raise
        raise tensor_error(exc, names) from None


def _bytes_array(rows: list[list[bytes]]) -> np.ndarray:
    array = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, row in enumerate(rows):
        array[i, :] = row
    return array


def _word_list(words: list[list[int]]) -> np.ndarray:
    """The backend's [1, 2, L] layout: concatenated ids, then end offsets padded with -1."""
    words = [w for w in words if w]
    ids = [t for w in words for t in w]
    offsets = list(np.cumsum([len(w) for w in words])) if words else []
    width = max(len(ids), 1)
    layout = np.full((1, 2, width), -1, dtype=np.int32)
    layout[0, 0, :] = 0
    layout[0, 0, :len(ids)] = ids
    layout[0, 1, :len(offsets)] = offsets
    return layout
