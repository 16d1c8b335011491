"""One benchmark sweep: check the target, then every protocol at every concurrency level, then the baseline.

What it is for: `connect` (a clear `TargetError` when nothing answers or the
model is not served), and `Sweep.run`, which fills a `BenchReport` level by
level (so that after Ctrl-C the caller still holds every finished level and
the interrupted one, marked partial). Each (protocol, level) gets fresh
prompts, so no level is served from cache entries an earlier one left; the
HF baseline gets the first protocol's prompts. The server's Prometheus
counters are read around each level.
A trtserve target describes itself through its native API (model card,
tokenizer). Any other server (a stock Triton server over the triton protocol,
another OpenAI-compatible server over the openai protocol) needs
`--tokenizer DIR`: prompts are then built and counted with that tokenizer.
Not for: argument parsing and output files (cli.py).
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import grpc
from tqdm import tqdm

from bench.backends import COUNT_SOURCES, NativeBackend, RequestRecord, TritonBackend
from bench.openai_backend import COUNT_SOURCE as OPENAI_COUNT_SOURCE
from bench.openai_backend import OpenAIBackend
from bench.baseline import HFBaseline
from bench.loadgen import Backend, LevelRun, run_level
from bench.report import BenchReport, RunResult
from bench.server_stats import Counters, ServerCounters
from bench.summary import LevelSummary, summarize
from bench.tokens import LocalTokenizer, RemoteTokenizer, Tokenizer
from bench.workloads import Session, WorkloadBuilder, WorkloadSpec
from grpc_service.client import NativeClient, TritonClient
from grpc_service.proto import trtserve_pb2 as pb

PROTOCOLS = ("native", "triton", "openai")
CONNECT_TIMEOUT_S = 10.0
DEFAULT_TOKENS_PER_BLOCK = 64       # TensorRT-LLM's default; only scales a stock Triton's reused-block count


class TargetError(RuntimeError):
    """The target cannot be benchmarked (unreachable, model unknown); the message says what to do."""


@dataclass(frozen=True, slots=True)
class Target:
    address: str | None                # gRPC host:port (native, triton)
    card: pb.ModelCard                 # trtserve's own; for other servers, built from --tokenizer and --model
    triton_model: str | None           # the ensemble's name when the triton protocol is used
    http_url: str | None = None        # OpenAI-compatible base URL (openai)
    system: str = "trtserve"           # the label of the runs in the report
    tokenizer_dir: str | None = None   # a local tokenizer instead of the server's Tokenize RPC


def connect(address: str | None, model: str, protocols: tuple[str, ...], timeout_s: float = CONNECT_TIMEOUT_S,
            http_url: str | None = None, tokenizer_dir: str | None = None,
            tokens_per_block: int = DEFAULT_TOKENS_PER_BLOCK, system: str | None = None) -> Target:
    """A trtserve target (its native API answers) or, with `tokenizer_dir`, any server speaking the protocols."""
    for protocol in protocols:
        if protocol in ("native", "triton") and address is None:
            raise TargetError(f"the {protocol} protocol needs a gRPC target (--target grpc://HOST:PORT)")
        if protocol == "openai" and http_url is None:
            raise TargetError("the openai protocol needs an HTTP target (--target http://HOST:PORT)")
    if tokenizer_dir is None:
        if address is None:
            raise TargetError("without a trtserve gRPC target, give --tokenizer DIR (the model's tokenizer) to "
                              "build and count prompts")
        card = _native_card(address, model, timeout_s)
    else:
        if "native" in protocols:
            raise TargetError("--tokenizer is for servers without the trtserve native API; drop it, or the "
                              "native protocol")
        name = _openai_model(http_url, model, timeout_s) if http_url is not None else (model or "ensemble")
        card = pb.ModelCard(name=name, vocab_size=LocalTokenizer(tokenizer_dir).vocab_size,
                            tokens_per_block=tokens_per_block)
    triton_model = None
    if "triton" in protocols:
        assert address is not None
        triton_model = _ensemble_name(address, card.name, 1 if tokenizer_dir else len(_native_cards(address)))
    label = system or ("trtserve" if tokenizer_dir is None else "server")
    return Target(address, card, triton_model, http_url, label, tokenizer_dir)


def _native_cards(address: str) -> list[pb.ModelCard]:
    client = NativeClient(address, timeout_s=CONNECT_TIMEOUT_S)
    try:
        return list(client.models())
    finally:
        client.close()


def _openai_model(http_url: str, model: str, timeout_s: float) -> str:
    import httpx2

    try:
        response = httpx2.get(f"{http_url.rstrip('/')}/v1/models", timeout=timeout_s)
        names = [m["id"] for m in response.json()["data"]]
    except (httpx2.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise TargetError(f"{http_url} does not answer GET /v1/models ({type(exc).__name__})") from None
    if model:
        if model not in names:
            raise TargetError(f"model {model!r} is not served by {http_url}; it serves: {', '.join(names)}")
        return model
    if len(names) != 1:
        raise TargetError(f"--model is required: {http_url} serves {', '.join(names) or 'nothing'}")
    return names[0]


def _native_card(address: str, model: str, timeout_s: float) -> pb.ModelCard:
    client = NativeClient(address, timeout_s=timeout_s)
    try:
        try:
            grpc.channel_ready_future(client.channel).result(timeout=timeout_s)
            cards = client.models()
        except grpc.FutureTimeoutError:
            raise TargetError(f"cannot reach grpc://{address}: no gRPC server answered within "
                              f"{timeout_s:g} s (is trtserve-serve running there?)") from None
        except grpc.RpcError as exc:
            raise TargetError(f"grpc://{address} does not answer trtserve.v1.LLMService/ListModels "
                              f"({exc.code().name}: {exc.details()}); for another server give "
                              "--tokenizer DIR") from None
    finally:
        client.close()
    names = [c.name for c in cards]
    card = cards[0] if not model and len(cards) == 1 else next((c for c in cards if c.name == model), None)
    if card is None:
        wanted = f"model {model!r} is not served" if model else "--model is required: several models are served"
        raise TargetError(f"{wanted} by grpc://{address}; it serves: {', '.join(names) or 'nothing'}")
    return card


def _ensemble_name(address: str, engine: str, num_engines: int) -> str:
    with TritonClient(address) as client:
        served = {name for name, _ in client.models()}
    for name in (f"{engine}_ensemble", "ensemble") if num_engines > 1 else ("ensemble", f"{engine}_ensemble"):
        if name in served:
            return name
    raise TargetError(f"grpc://{address} serves no KServe ensemble model for {engine!r} "
                      f"(models: {', '.join(sorted(served))})")


@dataclass(frozen=True, slots=True)
class SweepConfig:
    protocols: tuple[str, ...]
    concurrency: tuple[int, ...]
    num_requests: int
    num_warmup: int
    workload: WorkloadSpec
    metrics_url: str | None
    progress: bool = True


class Sweep:
    def __init__(self, config: SweepConfig, target: Target, report: BenchReport,
                 baseline: HFBaseline | None = None) -> None:
        self.config = config
        self.target = target
        self.report = report
        self.baseline = baseline
        self.client = NativeClient(target.address, timeout_s=60.0) if target.tokenizer_dir is None else None
        self.tokenizer: Tokenizer = (LocalTokenizer(target.tokenizer_dir) if self.client is None else
                                     RemoteTokenizer(self.client, target.card))
        self.builder = WorkloadBuilder(config.workload, self.tokenizer)
        self.counters = ServerCounters(config.metrics_url, target.card.name) if config.metrics_url else None
        self._sessions: dict[tuple[str, int], list[Session]] = {}

    def close(self) -> None:
        if self.client is not None:
            self.client.close()

    def sessions(self, protocol: str, concurrency: int) -> list[Session]:
        key = (protocol, concurrency)
        if key not in self._sessions:
            self._sessions[key] = self.builder.sessions(f"{protocol}-c{concurrency}", self.config.num_requests)
        return self._sessions[key]

    def run(self) -> None:
        for protocol in self.config.protocols:
            counts = OPENAI_COUNT_SOURCE if protocol == "openai" else COUNT_SOURCES[protocol]
            result = RunResult(self.target.system, protocol, dict(counts))
            self.report.runs.append(result)
            self._warm_up(protocol)
            for c in self.config.concurrency:
                self._server_level(protocol, c, result)
        if self.baseline is not None:
            result = RunResult(self.baseline.system, None, self.baseline.describe())
            self.report.runs.append(result)
            self.baseline.run_level(self.builder.sessions("warmup", min(self.config.num_warmup, 2)),
                                    LevelRun(2, 2))
            for c in self.config.concurrency:
                self._baseline_level(self.baseline, c, result)

    def _warm_up(self, protocol: str) -> None:
        if self.config.num_warmup <= 0:
            return
        sessions = self.builder.sessions(f"warmup-{protocol}", self.config.num_warmup)
        run = LevelRun(min(self.config.num_warmup, max(self.config.concurrency)), self.config.num_warmup)
        self._drive(protocol, sessions, run, None)
        failed = [r.error for r in run.records if r.error]
        if failed:
            raise TargetError(f"warm-up over {protocol} failed: {failed[0]}")

    def _server_level(self, protocol: str, concurrency: int, result: RunResult) -> None:
        sessions = self.sessions(protocol, concurrency)
        run = LevelRun(concurrency, self.config.num_requests)
        before = self.counters.snapshot() if self.counters else None
        self._measure(result, run, lambda tick: self._drive(protocol, sessions, run, tick),
                      f"{self.target.system} {protocol}", before)

    def _baseline_level(self, baseline: HFBaseline, concurrency: int, result: RunResult) -> None:
        sessions = self.sessions(self.config.protocols[0], concurrency)    # the same prompts as the server got
        run = LevelRun(concurrency, self.config.num_requests)
        self._measure(result, run, lambda tick: baseline.run_level(sessions, run, tick), baseline.system)

    def _measure(self, result: RunResult, run: LevelRun, drive: Callable[[Callable[[RequestRecord], None]], object],
                 label: str, before: Counters | None = None) -> None:
        """Drive one level with a progress bar; on any exit, summarize what was measured into `result`."""
        bar = tqdm(total=run.num_requests, desc=f"{label} c={run.concurrency}", unit="req", leave=False,
                   disable=not self.config.progress, dynamic_ncols=True)
        errors = 0

        def tick(record: RequestRecord) -> None:
            nonlocal errors
            errors += not record.ok
            bar.update(1)
            if errors:
                bar.set_postfix(errors=errors)

        try:
            drive(tick)
        finally:
            bar.close()
            self._count_prompts(run)
            after = self.counters.snapshot() if self.counters and before else None
            level = summarize(run.concurrency, run.records, run.partial,
                              after.hit_rate_since(before) if after and before else None)
            result.levels.append(_with_server_tokens(level, before, after))

    def _drive(self, protocol: str, sessions: list[Session], run: LevelRun,
               tick: Callable[[RequestRecord], None] | None) -> None:
        async def drive() -> None:
            backend = self._backend(protocol)
            try:
                await run_level(backend, sessions, run, tick)
            finally:
                await backend.close()

        asyncio.run(drive())

    def _backend(self, protocol: str) -> Backend:
        if protocol == "openai":
            assert self.target.http_url is not None
            return OpenAIBackend(self.target.http_url, self.target.card.name)
        assert self.target.address is not None
        if protocol == "native":
            return NativeBackend(self.target.address, self.target.card.name)
        assert self.target.triton_model is not None
        return TritonBackend(self.target.address, self.target.triton_model, self.target.card.tokens_per_block)

    def _count_prompts(self, run: LevelRun) -> None:
        """Prompt tokens the server did not report (Triton): the engine's tokenizer on what was sent."""
        try:
            for record in run.records:
                if record.ok and record.prompt_tokens is None:
                    record.prompt_tokens = len(self.tokenizer.encode(record.prompt_text)) + sum(
                        self.tokenizer.image_tokens(image) for image in record.prompt_images)
        except grpc.RpcError as exc:       # e.g. the server went away on Ctrl-C: leave the rest uncounted
            print(f"trtserve-bench: could not count prompt tokens ({exc.code().name})", file=sys.stderr)


def _with_server_tokens(level: LevelSummary, before: Counters | None, after: Counters | None) -> LevelSummary:
    if before is None or after is None:
        return level
    return replace(level, server_tokens={"prompt_tokens": int(after.prompt_tokens - before.prompt_tokens),
                                         "cached_tokens": int(after.cached_tokens - before.cached_tokens),
                                         "generated_tokens": int(after.generated_tokens - before.generated_tokens)})
