"""One served engine: its AsyncEngine, tokenizer, admission gate and metrics, behind one `generate`.

What it is for: `ServedModel`, which both APIs (native and KServe) call. It
loads an engine directory off the event loop, warms it up, turns text and chat
messages into token ids (with its own tokenizer instance, used only on the
tokenizer thread: `off_loop(fn, ...)` runs tokenizer work there, so that a long
text never blocks the event loop that also serves health and cancellation; the
engine thread keeps the runtime's tokenizer), bounds what one request may ask
of it (bad words, chat messages, ids to decode), admits requests
through a bounded `AdmissionGate` (beyond it: `Overloaded` at once), gives each
request a fresh internal id, records metrics, and guarantees that leaving the
stream early aborts the request (its KV blocks are freed within one step).
The engine core (scheduler, KV cache, model, sampler) runs in its own process by
default (runtime/core/process_engine.py; `StartedEngine.start`), or on a thread of
this one (`in_process`, trtserve-serve --no-engine-process); both behind the same
AsyncEngine interface. A vision-language engine also has a `VisualFrontend` (`visual`), which turns
images and videos into prompt ids plus `MultimodalInputs` off the event loop;
a text-only engine refuses them.
Not for: wire formats (native_service / triton_*), status codes (errors.py).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

from jinja2 import TemplateError

from grpc_service.errors import InvalidArgument, Overloaded, outcome_for
from grpc_service.metrics import EngineGaugeSource, ServerMetrics
from grpc_service.visual_inputs import (
    ChatContent,
    FieldNames,
    ImageSource,
    MediaPolicy,
    VideoSource,
    VisualFrontend,
)
from runtime.core.async_engine import AsyncEngine
from runtime.config import EngineConfig
from engine_format.engine_dir import LoadedEngine, load_engine
from runtime.core.engine_core import EngineCore, EngineRequest, EngineStats
from runtime.core.process_engine import ProcessEngine
from runtime.structured.grammars import GrammarCache
from runtime.multimodal.processor import MultimodalInputs
from runtime.outputs import RequestOutput
from engine_format.errors import EngineLoadError
from runtime.errors import FieldError
from runtime.sampling_params import (
    MAX_BAD_WORD_CHARS,
    MAX_BAD_WORDS,
    GuidedDecoding,
    SamplingParams,
    SamplingParamsError,
    check_list_size,
)

LOG = logging.getLogger(__name__)
MAX_PROMPT_CHARS_PER_TOKEN = 32     # refuse absurd texts before spending time tokenizing them
MAX_CHAT_MESSAGES = 1024            # messages in one chat prompt
MAX_CHAT_PARTS = 4096               # content parts (text, image, video) of all its messages together
_T = TypeVar("_T")
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class ModelLimits:
    vocab_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    tokens_per_block: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


class AdmissionGate:
    """Counts requests admitted and not finished; refuses beyond `limit` instead of queueing without bound."""

    def __init__(self, model_name: str, limit: int) -> None:
        self.model_name = model_name
        self.limit = limit
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> None:
        if self._in_flight >= self.limit:
            raise Overloaded(self.model_name, self.limit)
        self._in_flight += 1
        self._idle.clear()

    def release(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


def check_words(field: str, words: Sequence[object]) -> None:
    """A list of word texts (bad words) within MAX_BAD_WORDS entries and MAX_BAD_WORD_CHARS characters;
    INVALID_ARGUMENT naming `field` (this API's name) otherwise. Call it before any work on the entries."""
    try:
        check_list_size(field, words, MAX_BAD_WORDS, MAX_BAD_WORD_CHARS, "characters")
    except SamplingParamsError as exc:
        raise InvalidArgument(field, str(exc).split(": ", 1)[-1]) from None


@dataclass(frozen=True, slots=True)
class StartedEngine:
    """An engine core running (in its own process, or on a thread here) and what the front end needs of it."""

    loaded: LoadedEngine                 # manifest, limits, tokenizer, vision config
    engine: AsyncEngine | ProcessEngine
    max_batch_size: int
    kv_cache_bytes: int
    grammars: GrammarCache | None        # the in-process core's (shared: its step finds guides compiled)

    @classmethod
    def start(cls, engine_dir: Path, engine_config: EngineConfig, in_process: bool) -> StartedEngine:
        if in_process:
            core = EngineCore.from_dir(engine_dir, engine_config)
            return cls(core.engine, AsyncEngine(core), core.scheduler_config.max_batch_size,
                       core.executor.layout.kv_cache_bytes, core.grammars)
        # The front end's own load runs the same checks (a corrupt engine fails here, named, before any process
        # starts) and keeps the facts it needs; the weights are the core's alone.
        loaded = replace(load_engine(engine_dir), weights={})
        engine = ProcessEngine(engine_dir, engine_config)
        return cls(loaded, engine, engine.max_batch_size, engine.kv_cache_bytes, None)


class ServedModel:
    def __init__(self, started: StartedEngine, max_queue_size: int, metrics: ServerMetrics,
                 media: MediaPolicy | None = None) -> None:
        from transformers import AutoTokenizer

        loaded = started.loaded
        self.name = loaded.name
        self.engine_dir = loaded.root
        self.limits = ModelLimits(loaded.llm_config.vocab_size, started.max_batch_size, loaded.build.max_input_len,
                                  loaded.build.max_seq_len, loaded.build.tokens_per_block, loaded.eos_token_ids,
                                  loaded.pad_token_id)
        self.tokenizer = AutoTokenizer.from_pretrained(str(loaded.tokenizer_dir))
        # The ids that decode to text (the base vocabulary, no added tokens); the model's vocab_size may be
        # larger (padded rows, or a random-weight build over a small tokenizer).
        self.tokenizer_vocab_size = min(int(self.tokenizer.vocab_size), loaded.llm_config.vocab_size)
        self.grammars = started.grammars or GrammarCache(self.tokenizer, loaded.llm_config.vocab_size,
                                                         loaded.eos_token_ids)
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tokenizer-{self.name}")
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.gate = AdmissionGate(self.name, self.limits.max_batch_size + max_queue_size)
        self.metrics = metrics
        self.visual = (VisualFrontend(loaded, media or MediaPolicy(), self.gate.limit)
                       if loaded.vision is not None else None)
        self.engine = started.engine
        self.ready = False

    @classmethod
    async def load(cls, engine_dir: Path, engine_config: EngineConfig, max_queue_size: int,
                   metrics: ServerMetrics, media: MediaPolicy | None = None, in_process: bool = False) -> ServedModel:
        """Load off the event loop. A failure the loader did not name (a library's TypeError on a tokenizer file
        it cannot read, ...) becomes an EngineLoadError naming the engine directory (traceback at DEBUG), so the
        server stops with one line; named load errors, bad values (ValueError) and OSErrors pass as they are.
        The engine core runs in its own process unless `in_process` (then on a thread of this one)."""
        try:
            started = await asyncio.to_thread(StartedEngine.start, engine_dir, engine_config, in_process)
            model = await asyncio.to_thread(cls, started, max_queue_size, metrics, media)
        except (EngineLoadError, ValueError, OSError):
            raise
        except Exception as exc:
            LOG.debug("loading %s failed", engine_dir, exc_info=True)
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            raise EngineLoadError(str(engine_dir), f"cannot be loaded ({exc.__class__.__name__}: {first_line})") \
                from None
        metrics.attach(EngineGaugeSource(model.name, lambda: model.engine.call_threadsafe(lambda core: core.stats()),
                                         lambda: model.gate.in_flight, model.gate.limit,
                                         started.kv_cache_bytes))
        return model

    async def warm_up(self) -> None:
        """One short greedy request through the whole path (not counted in metrics), then ready."""
        ids = self.encode_text("warm up") or [0]
        request = EngineRequest(f"warmup-{uuid.uuid4().hex}", ids, SamplingParams.greedy_params(2))
        async for _ in self.engine.generate(request):
            pass
        self.ready = True

    # ---------------------------------------------------------------- text

    async def off_loop(self, fn: Callable[..., _T], *args: object) -> _T:
        """`fn(*args)` (tokenizer work: encode_text, encode_chat, tokenize_words, decode) on this model's
        tokenizer thread, one call at a time; the event loop stays free for other clients meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread,
                                                                functools.partial(fn, *args))

    def encode_text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        limit = self.limits.max_input_len * MAX_PROMPT_CHARS_PER_TOKEN
        if len(text) > limit:
            raise InvalidArgument("prompt", f"text of {len(text)} characters is too long (limit {limit}, "
                                            f"max_input_len {self.limits.max_input_len} tokens)")
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens)
        return [int(t) for t in encoded["input_ids"]]

    def check_chat(self, roles: Sequence[str], num_chars: int) -> None:
        """What every chat prompt must satisfy: a template, 1+ messages, known roles, bounded text."""
        if not self.has_chat_template:
            raise InvalidArgument("chat", f"model {self.name!r} has no chat template; send text or token ids")
        if not roles:
            raise InvalidArgument("chat.messages", "must hold at least 1 message")
        if len(roles) > MAX_CHAT_MESSAGES:
            raise InvalidArgument("chat.messages", f"{len(roles)} messages exceed the limit of {MAX_CHAT_MESSAGES}")
        for i, role in enumerate(roles):
            if role not in CHAT_ROLES:
                raise InvalidArgument("chat.messages", f"message {i}: role must be one of {CHAT_ROLES}, got {role!r}")
        limit = self.limits.max_input_len * MAX_PROMPT_CHARS_PER_TOKEN
        if num_chars > limit:
            raise InvalidArgument("chat.messages", f"{num_chars} characters of content is too long (limit {limit})")

    def encode_chat(self, messages: Sequence[tuple[str, str]], add_generation_prompt: bool = True) -> list[int]:
        self.check_chat([role for role, _ in messages], sum(len(content) for _, content in messages))
        return self.render_chat([{"role": role, "content": content} for role, content in messages],
                                add_generation_prompt)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, field: str = "chat.messages") -> list[int]:
        """Checked messages (role, content and, for tool use, tool_calls / tool_call_id) through the chat
        template; `tools` (JSON-schema function specs) are rendered by the template when given."""
        try:
            rendered = self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True,
                return_dict=True)
        except TemplateError as exc:      # the template's own raise_exception(...) messages are for users
            raise InvalidArgument(field, f"the chat template refused them: {exc.message}") from None
        return [int(t) for t in cast(dict[str, list[int]], rendered)["input_ids"]]

    @property
    def chat_template(self) -> str:
        template = getattr(self.tokenizer, "chat_template", None)
        return template if isinstance(template, str) else ""

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True, field: str = "token_ids") -> str:
        if len(token_ids) > self.limits.max_seq_len:
            raise InvalidArgument(field, f"{len(token_ids)} token ids exceed the limit of max_seq_len "
                                         f"({self.limits.max_seq_len})")
        self.check_token_ids(token_ids, field)
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def check_token_ids(self, token_ids: Sequence[int], field: str) -> None:
        vocab = self.limits.vocab_size
        for i, token_id in enumerate(token_ids):
            if not 0 <= int(token_id) < vocab:
                raise InvalidArgument(field, f"token id {int(token_id)} at index {i} is outside the vocabulary "
                                             f"[0, {vocab})")

    # ------------------------------------------------------- images, video

    @property
    def supports_images(self) -> bool:
        return self.visual is not None

    def _visual_frontend(self, field_name: str) -> VisualFrontend:
        if self.visual is None:
            raise InvalidArgument(field_name, f"model {self.name!r} is text-only; it accepts no images or videos")
        return self.visual

    async def encode_visual_chat(self, messages: Sequence[tuple[str, ChatContent]], add_generation_prompt: bool,
                                 names: FieldNames, visual_field: str) -> tuple[list[int], MultimodalInputs]:
        """Chat turns with image / video parts -> prompt ids and MultimodalInputs (INVALID_ARGUMENT on
        a text-only engine, naming `visual_field`)."""
        visual = self._visual_frontend(visual_field)
        self.check_chat([role for role, _ in messages],
                        sum(len(part) for _, content in messages for part in content if isinstance(part, str)))
        return await visual.chat(messages, add_generation_prompt, names)

    async def encode_visual_text(self, text: str, images: Sequence[ImageSource], videos: Sequence[VideoSource],
                                 names: FieldNames, visual_field: str) -> tuple[list[int], MultimodalInputs]:
        """A raw prompt (placeholders per image / video, or none) with its images and videos."""
        visual = self._visual_frontend(visual_field)
        limit = self.limits.max_input_len * MAX_PROMPT_CHARS_PER_TOKEN
        if len(text) > limit:
            raise InvalidArgument(names.rename("text"), f"text of {len(text)} characters is too long (limit {limit})")
        return await visual.text(text, images, videos, names)

    def tokenize_words(self, words: Sequence[str], field: str = "bad_words") -> tuple[tuple[int, ...], ...]:
        """Each non-empty word as the token ids it would be generated as (for bad-word lists), after checking
        the list's size (count first) against MAX_BAD_WORDS / MAX_BAD_WORD_CHARS."""
        check_words(field, words)
        return tuple(tuple(self.encode_text(w)) for w in words if w)

    # ---------------------------------------------------- structured output

    async def prepare_guide(self, guide: GuidedDecoding, field: str) -> None:
        """Compile a request's guide off the event loop (the engine step then finds it cached);
        InvalidArgument naming `field` (this API's name for it) when it cannot be enforced."""
        try:
            await asyncio.to_thread(self.grammars.compile, guide.validated())
        except FieldError as exc:
            raise InvalidArgument(field, str(exc).split(": ", 1)[-1]) from None

    # ---------------------------------------------------------- generation

    async def generate(self, prompt_ids: list[int], params: SamplingParams, api: str, cache_salt: str | None = None,
                       request_id: str | None = None,
                       multimodal: MultimodalInputs | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Admit (or raise Overloaded), then stream the engine's deltas (the engine judges the request itself:
        runtime/core/admission.py; its refusals come from the first iteration).

        `request_id` (default: a fresh uuid) must be unique among requests in flight; `abort(request_id)`
        then ends the request with finish_reason "abort". Close the iterator (`contextlib.aclosing`)
        when leaving early: that aborts the request too.
        """
        try:
            self.gate.acquire()
        except Overloaded:
            self.metrics.count_refusal(self.name, api, "resource_exhausted")
            raise
        tracker = self.metrics.track(self.name, api)
        outcome: str | None = None
        request = EngineRequest(request_id or uuid.uuid4().hex, prompt_ids, params, cache_salt, multimodal=multimodal)
        try:
            # AsyncEngine.generate is an async generator; its annotation says only AsyncIterator.
            engine_stream = cast(AsyncGenerator[RequestOutput, None], self.engine.generate(request))
            async with contextlib.aclosing(engine_stream) as outputs:
                async for output in outputs:
                    tracker.on_output(output)
                    if output.finished:
                        outcome = output.finish_reason or "stop"
                    yield output
        except (GeneratorExit, asyncio.CancelledError):
            outcome = outcome or "cancelled"     # the consumer left (client gone, deadline, stop)
            raise
        except BaseException as exc:
            outcome = outcome or outcome_for(exc)
            raise
        finally:
            self.gate.release()
            tracker.finish(outcome or "cancelled")

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def stats(self) -> EngineStats:
        return await self.engine.stats()

    def shutdown(self) -> None:
        self.ready = False
        self.engine.shutdown()
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)
        if self.visual is not None:
            self.visual.shutdown()
