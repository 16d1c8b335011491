"""Helpers for the tests that build quantized engines from a preset and serve them (test_quant_build*.py):
one build loop, one server over all the engines, one served-greedy check against the quantized reference."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from builder.quantize import QuantRequest
from grpc_service.client import NativeClient, Sampling, TritonClient
from tests.helpers.grpc_fixtures import Reference, ServerProcess

# name -> (dtype, --quant, --kv-cache-dtype, --calib-size, --export-hf)
QuantEngineSpec = tuple[str, str, str | None, int, bool]


def build_quant_engines(preset: str, specs: dict[str, QuantEngineSpec], root: Path,
                        cache_dir: Path) -> dict[str, Path]:
    """Build every spec from `preset` under `root`; each build's own validation must have passed."""
    out: dict[str, Path] = {}
    for name, (dtype, quant, kv, calib_size, export_hf) in specs.items():
        result = build_engine(BuildRequest(model=preset, output=root / name, dtype=dtype, cache_dir=cache_dir,
                                           quant=QuantRequest(quant, kv, None, calib_size, export_hf)),
                              Progress(6, enabled=False))
        assert result.validation is not None and result.validation["passed"], (name, result.validation)
        out[name] = result.output
    return out


@contextmanager
def serve_engines(engines: dict[str, Path], logs: Path) -> Iterator[ServerProcess]:
    """One trtserve-serve process over all the engines (each model named by its directory)."""
    args = [a for path in engines.values() for a in ("--engine", str(path))]
    process = ServerProcess.start(args + ["--no-warmup"], logs)
    try:
        yield process
    finally:
        process.stop()


def assert_served_greedy_matches_reference(engine: Path, server: ServerProcess, name: str, max_tokens: int) -> None:
    """Native API and Triton ensemble give the in-process quantized reference's greedy ids and text."""
    reference = Reference(engine)
    prompt = "The river runs past the old mill"
    text, ids = reference.greedy(reference.encode(prompt), max_tokens)
    with NativeClient(server.target) as native:
        assert native.generate(prompt, Sampling(max_tokens=max_tokens), model=name).token_ids == ids
    with TritonClient(server.target, model=f"{name}_ensemble") as triton:
        assert triton.generate(prompt, Sampling(max_tokens=max_tokens)) == text
