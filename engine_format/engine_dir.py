"""The engine directory contract: manifest schema, writing helpers and the guarded loader.

What it is for: everything that makes an engine directory self-describing and
safe to load: `engine.json` (format_version, source, build config, components,
checksums), path containment, checksum verification, and loading the LLM
checkpoint and the vision tower (`vision/`) with every tensor checked against
its config, the build limits and the tokenizer checked against the checkpoint
(consistency.py) (the tower's tensors from the header only; `VisionComponent.load_weights`
reads them where a backend needs them). Loading either returns a complete
`LoadedEngine` or raises `EngineLoadError` naming the file and the field;
nothing half-loads.
Not for: running the model (runtime/executor/model.py) or building (builder/).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine_format.checkpoint_layout import check_checkpoint_header
from engine_format.consistency import check_build_limits, check_pad_token, check_tokenizer
from engine_format.errors import EngineLoadError
from engine_format.llm_config import LLMConfig
from engine_format.safetensors_check import read_header_with_names
from engine_format.vision_config import VisionConfig, parse_vision_config, schema_of, vision_tensor_shapes

FORMAT_VERSION = 1
MANIFEST = "engine.json"
REQUIRED_KEYS = ("format_version", "trtserve_version", "source", "build", "components", "generation", "files")
BUILD_KEYS = ("dtype", "quantization", "kv_cache_dtype", "max_batch_size", "max_num_tokens",
              "max_input_len", "max_seq_len", "tokens_per_block", "kv_cache_reuse")
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
VISION_CONFIG, VISION_WEIGHTS = "vision/config.json", "vision/encoder.safetensors"   # names in messages


@dataclass(frozen=True, slots=True)
class EngineBuildConfig:
    dtype: str
    quantization: str
    kv_cache_dtype: str
    max_batch_size: int
    max_num_tokens: int
    max_input_len: int
    max_seq_len: int
    tokens_per_block: int
    kv_cache_reuse: bool


@dataclass(frozen=True, slots=True)
class VisionComponent:
    config: VisionConfig             # the family's own frozen config (engine_format/families/)
    weights_path: Path               # vision/encoder.safetensors, its header checked at load
    onnx_path: Path                  # vision/encoder.onnx (its external data, if any, lies beside it)
    plan_path: Path | None = None    # vision/encoder.plan, only where TensorRT built it
    onnx_int8_path: Path | None = None   # vision/encoder.int8.onnx (--vision-quant int8): Q/DQ graph the
                                         # onnxruntime backend runs instead of onnx_path when present

    def load_weights(self) -> dict[str, Any]:
        """HF tower names without prefix -> torch.Tensor (CPU), checked against the config again.

        Only the pytorch backend (and the builder's checks) need the tensors; the ONNX and TensorRT
        backends read their own files, so loading an engine does not read them.
        """
        from safetensors.torch import load_file

        _check_header(self.weights_path, VISION_WEIGHTS, vision_tensor_shapes(self.config), self.config.dtype,
                      VISION_CONFIG)
        return load_file(str(self.weights_path))


@dataclass(frozen=True, slots=True)
class LoadedEngine:
    root: Path
    manifest: dict[str, Any]
    build: EngineBuildConfig
    llm_config: LLMConfig
    weights: dict[str, Any]          # name -> torch.Tensor (CPU)
    tokenizer_dir: Path
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    vision: VisionComponent | None = None

    @property
    def name(self) -> str:
        return str(self.manifest.get("name", self.root.name))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_checksums(root: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict[str, Any]]:
    """Checksums of every regular file under root, keyed by relative POSIX path."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return out


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    data = {**manifest, "format_version": FORMAT_VERSION, "files": file_checksums(root)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(root / MANIFEST)


def inside(root: Path, rel: Any, file: str, field: str) -> Path:
    """Resolve a manifest path, refusing absolute paths and anything escaping root."""
    if not isinstance(rel, str) or not rel:
        raise EngineLoadError(file, "expected a relative path string", field)
    if Path(rel).is_absolute():
        raise EngineLoadError(file, f"path {rel!r} must be relative", field)
    path = (root / rel).resolve()
    if not path.is_relative_to(root.resolve()):
        raise EngineLoadError(file, f"path {rel!r} escapes the engine directory", field)
    return path


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise EngineLoadError(str(path), "missing; not an engine directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineLoadError(MANIFEST, f"invalid JSON ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise EngineLoadError(MANIFEST, "expected a JSON object")
    for key in REQUIRED_KEYS:
        if key not in data:
            raise EngineLoadError(MANIFEST, "missing key", key)
    if data["format_version"] != FORMAT_VERSION:
        raise EngineLoadError(MANIFEST, f"unknown format_version {data['format_version']!r} "
                              f"(this trtserve reads {FORMAT_VERSION}); rebuild the engine", "format_version")
    return data


def verify_files(root: Path, files: Any) -> None:
    if not isinstance(files, dict) or not files:
        raise EngineLoadError(MANIFEST, "expected a non-empty object", "files")
    for rel, entry in files.items():
        path = inside(root, rel, MANIFEST, f"files[{rel!r}]")
        if not path.is_file():
            raise EngineLoadError(rel, "missing (listed in engine.json files)")
        if not isinstance(entry, dict) or "sha256" not in entry:
            raise EngineLoadError(MANIFEST, "expected {sha256, size}", f"files[{rel!r}]")
        if entry.get("size") not in (None, path.stat().st_size) or sha256_file(path) != entry["sha256"]:
            raise EngineLoadError(rel, "checksum mismatch: the file changed after the build")


def parse_build(data: Any) -> EngineBuildConfig:
    if not isinstance(data, dict):
        raise EngineLoadError(MANIFEST, "expected an object", "build")
    for key in BUILD_KEYS:
        if key not in data:
            raise EngineLoadError(MANIFEST, "missing key", f"build.{key}")
    build = EngineBuildConfig(**{k: data[k] for k in BUILD_KEYS})
    for key in ("max_batch_size", "max_num_tokens", "max_input_len", "max_seq_len", "tokens_per_block"):
        value = getattr(build, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise EngineLoadError(MANIFEST, f"expected a positive integer, got {value!r}", f"build.{key}")
    return build


def load_engine(root: str | Path, verify_checksums: bool = True) -> LoadedEngine:
    root = Path(root)
    manifest = read_manifest(root)
    if verify_checksums:
        verify_files(root, manifest["files"])
    build = parse_build(manifest["build"])
    comps = manifest["components"]
    llm = comps.get("llm") if isinstance(comps, dict) else None
    if not isinstance(llm, dict):
        raise EngineLoadError(MANIFEST, "missing component", "components.llm")
    config_rel = llm.get("config")
    config_path = inside(root, config_rel, MANIFEST, "components.llm.config")
    llm_config = _read_llm_config(config_path, config_rel)
    check_build_limits(build, llm_config, config_rel)
    weights_rel = llm.get("weights")
    weights_path = inside(root, weights_rel, MANIFEST, "components.llm.weights")
    weights = _load_weights(weights_path, weights_rel, llm_config)
    tok_rel = comps.get("tokenizer", {}).get("dir") if isinstance(comps.get("tokenizer"), dict) else None
    tokenizer_dir = inside(root, tok_rel, MANIFEST, "components.tokenizer.dir")
    check_tokenizer(tokenizer_dir, tok_rel, llm_config.vocab_size)
    gen = manifest["generation"]
    eos = gen.get("eos_token_ids") if isinstance(gen, dict) else None
    if not isinstance(eos, list) or not all(isinstance(t, int) and 0 <= t < llm_config.vocab_size for t in eos):
        raise EngineLoadError(MANIFEST, f"expected a list of token ids below vocab_size ({llm_config.vocab_size})",
                              "generation.eos_token_ids")
    check_pad_token(gen.get("pad_token_id"), llm_config.vocab_size)
    if llm_config.mrope_section is not None and "vision" not in comps:
        raise EngineLoadError(MANIFEST, f"{llm_config.architecture} needs a vision tower", "components.vision")
    vision = _load_vision(root, comps["vision"], llm_config) if "vision" in comps else None
    return LoadedEngine(root, manifest, build, llm_config, weights, tokenizer_dir, tuple(eos),
                        gen.get("pad_token_id"), vision)


def _read_json(path: Path, rel: str) -> Any:
    if not path.is_file():
        raise EngineLoadError(rel, "missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineLoadError(rel, f"invalid JSON ({exc.__class__.__name__})") from None


def _read_llm_config(path: Path, rel: str) -> LLMConfig:
    return LLMConfig.from_json(_read_json(path, rel), rel)


def _load_vision(root: Path, comp: Any, llm: LLMConfig) -> VisionComponent:
    if not isinstance(comp, dict):
        raise EngineLoadError(MANIFEST, "expected an object", "components.vision")
    paths = {key: inside(root, comp.get(key), MANIFEST, f"components.vision.{key}")
             for key in ("config", "weights", "onnx")}
    config = parse_vision_config(_read_json(paths["config"], comp["config"]), comp["config"])
    _check_vision_llm(config, llm, comp["config"])
    _check_header(paths["weights"], comp["weights"], vision_tensor_shapes(config), config.dtype, comp["config"])
    for key in ("onnx", "onnx_data", "plan", "onnx_int8", "onnx_int8_data"):
        if key in comp and not inside(root, comp[key], MANIFEST, f"components.vision.{key}").is_file():
            raise EngineLoadError(comp[key], "missing (listed in engine.json components.vision)")
    plan = inside(root, comp["plan"], MANIFEST, "components.vision.plan") if "plan" in comp else None
    int8 = inside(root, comp["onnx_int8"], MANIFEST, "components.vision.onnx_int8") if "onnx_int8" in comp else None
    return VisionComponent(config, paths["weights"], paths["onnx"], plan, int8)


def _check_vision_llm(config: VisionConfig, llm: LLMConfig, rel: str) -> None:
    """The family's tower and the LLM fit: architecture, position scheme, width, token ids."""
    if (config.position_scheme == "mrope") != (llm.mrope_section is not None):
        need = "an M-RoPE" if config.position_scheme == "mrope" else "a 1-D RoPE"
        raise EngineLoadError(rel, f"a {config.model_type} vision tower needs {need} language model; "
                              f"llm architecture is {llm.architecture}", "model_type")
    architectures = schema_of(config).llm_architectures
    if llm.architecture not in architectures:
        raise EngineLoadError(rel, f"a {config.model_type} vision tower sits on {', '.join(architectures)}; "
                              f"llm architecture is {llm.architecture}", "model_type")
    if config.out_hidden_size != llm.hidden_size:
        raise EngineLoadError(rel, f"{config.out_hidden_size} disagrees with the LLM hidden_size "
                              f"{llm.hidden_size}", "out_hidden_size")
    for key, token_id in config.token_ids.items():
        if not 0 <= token_id < llm.vocab_size:
            raise EngineLoadError(rel, f"outside the vocabulary (vocab_size {llm.vocab_size})", key)


def _load_weights(path: Path, rel: str, cfg: LLMConfig) -> dict[str, Any]:
    from safetensors.torch import load_file

    check_checkpoint_header(path, rel, cfg)          # names / shapes / dtypes, quantized tensors included
    return load_file(str(path))


def _check_header(path: Path, rel: str, expected: dict[str, tuple[int, ...]], dtype: str,
                  config_name: str) -> None:
    """Check a safetensors file's names, shapes and dtype against its config, reading only the header."""
    header = read_header_with_names(path, rel, expected)
    want_dtype = SAFETENSORS_DTYPES[dtype]
    for name, shape in expected.items():
        got_dtype, got = header[name]
        if got != shape:
            raise EngineLoadError(rel, f"shape {list(got)} disagrees with {config_name} (expected {list(shape)})", name)
        if got_dtype != want_dtype:
            raise EngineLoadError(rel, f"dtype {got_dtype} disagrees with {config_name} dtype {dtype}", name)
