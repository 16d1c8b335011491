"""The build pipeline: source -> convert -> (vision: convert, export ONNX, compile) -> (quantize) ->
(compile) -> validate -> manifest.

What it is for: composing the build stages into one function that writes a
complete engine directory atomically (a failed build leaves no half engine),
and skipping the work when the inputs' content hash has not changed.
Not for: argument parsing (builder/cli.py) or any stage's internals.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from builder.convert import convert_state_dict, llm_config_from_hf, read_hf_state_dict, write_checkpoint
from builder.perplexity import MAX_TEXT_TOKENS
from builder.presets import BuildSettings
from builder.progress import Progress
from builder.calib_data import CalibSample
from builder.quantize import QuantRequest, check_quant_request
from builder.quantize_stage import QuantOutcome, quant_input_hash, quant_summary_line, quantize_engine, quantize_report
from builder.vision_quant import add_int8_pair, validate_vision_int8
from builder.source import ResolvedSource, resolve_source
from builder.validate import validate_engine
from builder.validate_vision import add_vision_report, validate_vision, vision_summary, vision_summary_line
from builder.vision_build import NUM_STAGES as VISION_STAGES
from builder.vision_build import build_vision
from builder.families import build_family_for
from engine_format.engine_dir import FORMAT_VERSION, EngineLoadError, load_engine, read_manifest, verify_files, write_manifest

TRTSERVE_VERSION = "0.1.0"
BUILDER_VERSION = 1          # bump when the output of a stage changes for the same inputs
# Random weights make perplexity a pure engine-vs-HF agreement check (both near the vocabulary size):
# one short window does that, and keeps validating real-shape random builds affordable on CPU.
RANDOM_WEIGHTS_PERPLEXITY_TOKENS = 256


@dataclass(frozen=True, slots=True)
class BuildRequest:
    model: str
    output: Path
    dtype: str | None = None                 # None: the preset's dtype (fp32 for HF dirs)
    random_weights: bool = False
    force: bool = False
    validate: bool = True
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "trtserve")
    overrides: dict[str, Any] = field(default_factory=dict)   # BuildSettings fields
    quant: QuantRequest = field(default_factory=QuantRequest)
    # The HF model validation compares with, already loaded by the caller (builder/validate.py
    # `validate_engine(reference=...)`); None: validation loads it. Not part of the input hash.
    reference: Any | None = None


@dataclass(frozen=True, slots=True)
class BuildResult:
    output: Path
    skipped: bool
    validation: dict[str, Any] | None


def build_engine(request: BuildRequest, progress: Progress | None = None) -> BuildResult:
    progress = progress or Progress(6)
    with progress.stage("resolve model source"):
        source = resolve_source(request.model, request.cache_dir, request.random_weights)
        vision_language = build_family_for(source.family) is not None
        if vision_language:
            progress.num_stages += VISION_STAGES
        settings = _settings(source, request)
        samples = check_quant_request(request.quant, json.loads((source.hf_dir / "config.json").read_text()),
                                    vision_language)
        input_hash = _input_hash(source, settings, request.validate)
        if request.quant.calibrates:
            input_hash = quant_input_hash(input_hash, request.quant, samples)
    if not request.force and _up_to_date(request.output, input_hash):
        progress.skip("build", f"{request.output} is up to date (input hash {input_hash[:12]}); --force rebuilds")
        return BuildResult(request.output, True, None)
    request.output.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{request.output.name}.", dir=request.output.parent))
    try:
        manifest = _build_into(work, source, settings, request, input_hash, progress, samples)
        if request.output.exists():
            shutil.rmtree(request.output)
        work.replace(request.output)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return BuildResult(request.output, False, manifest.get("validation"))


def _build_into(work: Path, source: ResolvedSource, settings: BuildSettings, request: BuildRequest,
                input_hash: str, progress: Progress, samples: list[CalibSample]) -> dict[str, Any]:
    hf_config = json.loads((source.hf_dir / "config.json").read_text())
    family = build_family_for(source.family)       # a vision-language family, or None (builder/families/)
    with progress.stage("convert weights to the TensorRT-LLM checkpoint layout"):
        if family is None:
            cfg = llm_config_from_hf(hf_config, source.architecture, settings.dtype)
            hf_state = read_hf_state_dict(source.hf_dir)
            tensors = convert_state_dict(hf_state, cfg)
        else:
            cfg = llm_config_from_hf(hf_config, family.llm_architecture(hf_config), settings.dtype,
                                     family.text_config(hf_config))
            hf_state = read_hf_state_dict(source.hf_dir)
            keys = family.llm_keys(hf_state.keys())
            tensors = convert_state_dict(hf_state, cfg, keys.prefix, keys.lm_head)
        if not request.quant.active:
            write_checkpoint(work / "llm", cfg, tensors)
        progress.note(f"{cfg.architecture}, {cfg.num_hidden_layers} layers, dtype {cfg.dtype}")
    vision = None
    if family is not None:
        preprocessing = source.preset.preprocessing if source.preset else None
        vision = build_vision(work, source.hf_dir, settings.dtype, preprocessing, hf_state, progress, family)
    del hf_state
    with progress.stage("copy tokenizer"):
        eos_ids, pad_id = _copy_tokenizer(source, work / "tokenizer", hf_config)
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION, "trtserve_version": TRTSERVE_VERSION,
        "name": request.output.name, "input_hash": input_hash,
        "source": {**source.description, "architecture": source.architecture},
        "build": {**asdict(settings), "quantization": request.quant.quant or "none",
                  "kv_cache_dtype": request.quant.kv_cache_dtype or settings.dtype},
        "components": {"llm": {"config": "llm/config.json", "weights": "llm/rank0.safetensors"},
                       "tokenizer": {"dir": "tokenizer"}},
        "compile": {"tensorrt_llm": {"built": False, "reason": _trtllm_missing_reason()}},
        "generation": {"eos_token_ids": eos_ids, "pad_token_id": pad_id},
    }
    if vision is not None:
        manifest["components"]["vision"] = vision.component
        manifest["compile"]["tensorrt_vision"] = vision.compile
    quant: QuantOutcome | None = None
    vision_int8 = None
    if request.quant.calibrates:
        with progress.stage(f"quantize ({request.quant.quant or 'float'} weights, KV cache "
                            f"{request.quant.kv_cache_dtype or settings.dtype}, vision tower "
                            f"{request.quant.vision_quant or 'float'})"):
            quant, vision_int8 = quantize_engine(work, source.hf_dir, source.tokenizer_dir, cfg, tensors,
                                                 request.quant, samples, manifest)
    else:
        progress.skip("quantize", "quantization 'none'")
    progress.skip("compile TensorRT-LLM engine", _trtllm_missing_reason())
    if quant is None:
        del tensors
    else:
        manifest["quantization"] = quant.manifest
    if vision_int8 is not None:
        manifest["build"]["vision_quantization"] = request.quant.vision_quant
        manifest["vision_quantization"] = vision_int8.manifest
    write_manifest(work, manifest)
    if request.validate:
        with progress.stage("validate against the HF reference" if quant is None
                            else "validate against the same model unquantized"):
            engine = load_engine(work)          # once, as the server will load it
            if quant is not None:
                report = quantize_report(engine, cfg, tensors)
                progress.note(quant_summary_line(report))
            else:
                report = validate_engine(engine, source.hf_dir, gguf_file=source.gguf_file,
                                         perplexity_tokens=RANDOM_WEIGHTS_PERPLEXITY_TOKENS
                                         if source.random_weights else MAX_TEXT_TOKENS,
                                         reference=request.reference)
                progress.note(f"max abs err {report['max_abs_err']:.2e}, greedy agreement "
                              f"{report['greedy_agreement']:.3f}, perplexity {report['perplexity']['engine']:.3f} "
                              f"(HF {report['perplexity']['reference']:.3f}), passed: {report['passed']}")
            if vision is not None:
                report = add_vision_report(report, validate_vision(engine, source.hf_dir))
                if vision_int8 is not None and engine.vision is not None and engine.vision.onnx_int8_path:
                    report = add_int8_pair(report, validate_vision_int8(engine, engine.vision.onnx_int8_path))
                progress.note(vision_summary_line(report["vision"]))
            del engine
            (work / "validation.json").write_text(json.dumps(report, indent=2) + "\n")
        manifest["validation"] = {k: report[k] for k in ("passed", "max_abs_err", "max_rel_err",
                                                           "greedy_agreement", "decisive_disagreements")}
        if "perplexity" in report:
            manifest["validation"]["perplexity"] = {k: report["perplexity"][k] for k in ("engine", "reference")}
        if vision is not None:
            manifest["validation"]["vision"] = vision_summary(report["vision"])
        manifest["validation"]["file"] = "validation.json"
    else:
        progress.skip("validate against the HF reference", "--no-validate")
    write_manifest(work, manifest)
    return manifest


def _settings(source: ResolvedSource, request: BuildRequest) -> BuildSettings:
    base = source.preset.build if source.preset else BuildSettings()
    changes = {k: v for k, v in request.overrides.items() if v is not None}
    if request.dtype:
        changes["dtype"] = request.dtype
    settings = replace(base, **changes)
    settings.validate("build settings")
    return settings


def _input_hash(source: ResolvedSource, settings: BuildSettings, validate: bool) -> str:
    digest = hashlib.sha256(json.dumps(
        {"builder": BUILDER_VERSION, "trtserve": TRTSERVE_VERSION, "settings": asdict(settings),
         "validate": validate, "architecture": source.architecture}, sort_keys=True).encode())
    for directory in sorted({source.hf_dir, source.tokenizer_dir}):
        for path in sorted(directory.iterdir()):
            if path.is_file() and path.suffix in (".json", ".safetensors", ".jinja", ".model", ".txt"):
                digest.update(path.name.encode())
                with path.open("rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        digest.update(chunk)
    return digest.hexdigest()


def _up_to_date(output: Path, input_hash: str) -> bool:
    try:
        manifest = read_manifest(output)
        verify_files(output, manifest["files"])
    except EngineLoadError:
        return False
    return manifest.get("input_hash") == input_hash


def _copy_tokenizer(source: ResolvedSource, out: Path, hf_config: dict[str, Any]) -> tuple[list[int], int | None]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = processor_chat_template(source.hf_dir)
    tokenizer.save_pretrained(str(out))
    eos: list[int] = []
    gen_path = source.hf_dir / "generation_config.json"
    candidates = [hf_config.get("eos_token_id"), tokenizer.eos_token_id]
    if gen_path.is_file():
        candidates.insert(0, json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in candidates:
        for token in value if isinstance(value, list) else [value]:
            if isinstance(token, int) and token not in eos:
                eos.append(token)
    return eos, tokenizer.pad_token_id


def processor_chat_template(hf_dir: Path) -> str | None:
    """The chat template a checkpoint keeps with its processor only (`chat_template.json`, as llava-hf's
    do), which AutoTokenizer does not read; None when there is none."""
    path = hf_dir / "chat_template.json"
    if not path.is_file():
        return None
    template = json.loads(path.read_text()).get("chat_template")
    return template if isinstance(template, str) else None


def _trtllm_missing_reason() -> str:
    import importlib.util

    if importlib.util.find_spec("tensorrt_llm") is None:
        return "tensorrt_llm is not installed; the engine runs on the PyTorch executor"
    return "trtllm-build is not run by this version; feed llm/ to trtllm-build --checkpoint_dir"
