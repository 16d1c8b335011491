"""The engine-core process: EngineCore in a busy loop behind two ZeroMQ sockets.

Started by runtime/core/process_engine.py as `python -m runtime.core.core_process`
(a fresh interpreter: nothing of the server's state, and the EngineConfig as JSON).

What it is for: `run_core`, the child process's whole life: load the engine,
say `CoreReady` (or `CoreFailed`), then loop: apply every pending command
(admit, abort, stats, shutdown), run one step while any request is unfinished,
and send the step's deltas as one `CoreOutputs` message. With work it never
sleeps (busy loop: the next step starts as soon as the previous one's outputs
are sent); idle, it blocks on its inbox for at most IDLE_POLL_MS and exits when
its parent is gone. The core sends token ids only: it applies the token stop
rules (EOS, stop token ids, max_tokens) and nothing else (EngineCore with
`text_output=False`); detokenization and stop strings run in the front end,
which aborts a request here when its text hits a stop string (its KV blocks are
freed within a step). Everything else a client sends (gRPC, HTTP, tokenization,
chat templates, image decoding and preprocessing, streaming) stays in the
server process too. A structured-output request whose
grammar this process has not compiled yet waits in `PendingGuides` while a
worker thread compiles it; the loop keeps stepping the other requests and
admits it once compiled (the step never waits for a compilation). With
`cpu_threads` 0 (auto) each step's torch thread count follows its GEMM work
(`install_thread_policy`, runtime/core/thread_policy.py): one thread for small
steps, whose parallel GEMMs would wait on the front end's use of a core; every
core for large ones while their measured step times (`step_done`) say it pays.
Not for: the client side (runtime/core/process_engine.py) or message types (ipc.py).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor

import msgspec
import torch
import zmq

from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore
from runtime.core.ipc import (
    AbortRequest,
    AddRefused,
    Codec,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    Shutdown,
    StatsQuery,
    StatsReply,
    WireRequest,
)
from runtime.core.thread_policy import StepThreads, model_work, policy_for
from runtime.errors import FieldError

LOG = logging.getLogger(__name__)
IDLE_POLL_MS = 100
COMPILE_POLL_MS = 2          # idle but a grammar is compiling: look again this soon


class PendingGuides:
    """Guided requests waiting for their grammar, compiled on one worker thread (GrammarCache is thread-safe)."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        self._waiting: dict[str, tuple[WireRequest, Future[object]]] = {}

    def __bool__(self) -> bool:
        return bool(self._waiting)

    def defer(self, core: EngineCore, message: WireRequest) -> bool:
        """True when `message` must wait for its grammar (its compilation is then started)."""
        guide = message.sampling_params.guided_decoding
        if guide is None or core.grammars.is_cached(guide):
            return False
        self._waiting[message.request_id] = (message, self._pool.submit(core.grammars.compile, guide))
        return True

    def drop(self, request_id: str) -> bool:
        return self._waiting.pop(request_id, None) is not None

    def ready(self) -> list[WireRequest]:
        """Requests whose compilation ended (a failed one is refused at admission, naming the guide)."""
        done = [rid for rid, (_, future) in self._waiting.items() if future.done()]
        return [self._waiting.pop(rid)[0] for rid in done]


def run_core(engine_dir: str, config: EngineConfig, inbox_address: str, outbox_address: str,
             parent_pid: int) -> None:
    """The child process's life (`main` parses its command line)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [core] %(name)s: %(message)s")
    _leave_signals_to_the_server(parent_pid)
    context = zmq.Context()
    inbox = context.socket(zmq.PULL)
    inbox.connect(inbox_address)
    outbox = context.socket(zmq.PUSH)
    outbox.connect(outbox_address)
    codec = Codec()
    if config.cpu_threads:          # this process is the engine's own: its thread count is its to set
        torch.set_num_threads(config.cpu_threads)
    try:
        core = EngineCore.from_dir(engine_dir, config, text_output=False)
        threads = install_thread_policy(core, config.cpu_threads)
    except BaseException as exc:  # the front end reports it and exits; nothing else can use this process
        outbox.send(codec.encode(CoreFailed(f"{type(exc).__name__}: {exc}")))
        outbox.close(linger=2000)
        context.term()
        raise SystemExit(1) from None
    outbox.send(codec.encode(CoreReady(core.executor.layout.kv_cache_bytes, core.scheduler_config.max_batch_size,
                                       os.getpid(), str(core.engine.tokenizer_dir),
                                       list(core.engine.eos_token_ids))))
    try:
        _loop(core, inbox, outbox, codec, parent_pid, threads)
    finally:
        inbox.close(linger=0)
        outbox.close(linger=1000)
        context.term()


def install_thread_policy(core: EngineCore, cpu_threads: int) -> StepThreads | None:
    """Served beside the front end: the step's thread count from its GEMM work (runtime/core/thread_policy.py).
    Overlapped steps run their forward on a worker thread, whose OpenMP thread count this thread cannot set:
    they keep the count set at start."""
    policy = policy_for(cpu_threads, served=True, device_type=core.executor.layout.device.type,
                        max_threads=torch.get_num_threads(), work=model_work(core.engine.llm_config),
                        vision=core.executor.vision is not None)
    if policy is None or policy.fixed is not None or core.overlap:
        return None
    hook = StepThreads(policy)
    core.before_forward = hook
    return hook


def _leave_signals_to_the_server(parent_pid: int) -> None:
    """Ctrl-C at a terminal, or SIGTERM sent to the server's process group (a container runtime, `timeout`,
    `kill -- -PGID`), reaches this process too. The server drains its requests and then sends `Shutdown`, so
    the core ignores SIGINT, and SIGTERM while its server lives (an orphaned core exits on SIGTERM)."""
    def on_sigterm(signum: int, frame: object) -> None:
        if os.getppid() != parent_pid:
            raise SystemExit(0)
        LOG.info("SIGTERM ignored: the server process drains the requests and stops the engine core")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)


def _loop(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, codec: Codec, parent_pid: int,
          threads: StepThreads | None) -> None:
    guides = PendingGuides()
    while True:
        idle = not core.has_unfinished()
        timeout_ms = 0 if not idle else (COMPILE_POLL_MS if guides else IDLE_POLL_MS)
        if not _apply_pending(core, inbox, outbox, codec, timeout_ms, guides):
            return
        for message in guides.ready():
            reply = _admit(core, message)
            if reply is not None:
                outbox.send(codec.encode(reply))
        if core.has_unfinished():
            start = time.perf_counter()
            outputs = core.step()
            if threads is not None:
                threads.step_done(time.perf_counter() - start)
            if outputs:
                outbox.send(codec.encode(CoreOutputs(outputs)))
        elif os.getppid() != parent_pid:
            LOG.warning("the server process is gone; the engine core exits")
            return


def _apply_pending(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, codec: Codec, timeout_ms: int,
                   guides: PendingGuides) -> bool:
    """Apply every command waiting (waiting up to `timeout_ms` for the first); False: shut down."""
    if not inbox.poll(timeout_ms):
        return True
    while True:
        try:
            data = inbox.recv(zmq.NOBLOCK)
        except zmq.Again:
            return True
        message = codec.decode_to_core(data)
        if isinstance(message, Shutdown):
            return False
        reply = _apply(core, message, guides)
        if reply is not None:
            outbox.send(codec.encode(reply))


def _apply(core: EngineCore, message: WireRequest | AbortRequest | StatsQuery, guides: PendingGuides
           ) -> CoreOutputs | AddRefused | StatsReply | None:
    if isinstance(message, WireRequest):
        return None if guides.defer(core, message) else _admit(core, message)
    if isinstance(message, AbortRequest):
        if guides.drop(message.request_id):       # never admitted: nothing to free, no output to send
            return None
        output = core.abort(message.request_id)
        return CoreOutputs([output]) if output is not None else None
    try:
        return StatsReply(message.call_id, core.stats())
    except Exception as exc:  # a stats failure must not stop the engine
        return StatsReply(message.call_id, None, f"{type(exc).__name__}: {exc}")


def _admit(core: EngineCore, message: WireRequest) -> AddRefused | None:
    try:
        core.add_request(message.engine_request())
    except FieldError as exc:
        return AddRefused(message.request_id, exc.field, str(exc).split(": ", 1)[-1])
    except ValueError as exc:
        return AddRefused(message.request_id, "", str(exc))
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="trtserve engine core (started by the server)")
    parser.add_argument("--engine-dir", required=True)
    parser.add_argument("--config-json", required=True, help="EngineConfig as JSON")
    parser.add_argument("--inbox", required=True)
    parser.add_argument("--outbox", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    config = msgspec.json.decode(args.config_json, type=EngineConfig)
    run_core(args.engine_dir, config, args.inbox, args.outbox, args.parent_pid)


if __name__ == "__main__":
    main(sys.argv[1:])
