"""Model presets: YAML files under builder/configs/models loaded into frozen dataclasses.

What it is for: naming a model (its family, where its weights come from, its
architecture for random-weight builds) and its default build settings.
Not for: reading checkpoints or building anything (see builder/source.py and
builder/pipeline.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from builder.families import BUILD_FAMILIES, build_family_for, vl_model_types

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
PRESETS_DIR = CONFIGS_DIR / "models"

TEXT_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# Vision-language families (builder/families/) add their HF model types.
ARCHITECTURES = {**TEXT_ARCHITECTURES,
                 **{model_type: arch for family in BUILD_FAMILIES for model_type, arch in family.hf_architectures.items()}}
FAMILIES = tuple(ARCHITECTURES)
VL_FAMILIES = vl_model_types()
SOURCES = ("random", "hub", "gguf")
TOKENIZERS = ("offline", "source")
DTYPES = ("fp32", "fp16", "bf16")


class PresetError(ValueError):
    """A preset file is missing or holds an invalid value; the message names both."""


@dataclass(frozen=True, slots=True)
class BuildSettings:
    """Engine limits written into the manifest; the runtime serves within them."""

    dtype: str = "fp32"
    max_batch_size: int = 16
    max_input_len: int = 1024
    max_seq_len: int = 2048
    max_num_tokens: int = 2048
    tokens_per_block: int = 16
    kv_cache_reuse: bool = True

    def validate(self, origin: str) -> None:
        if self.dtype not in DTYPES:
            raise PresetError(f"{origin}: build.dtype must be one of {DTYPES}, got {self.dtype!r}")
        for name in ("max_batch_size", "max_input_len", "max_seq_len", "max_num_tokens", "tokens_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PresetError(f"{origin}: build.{name} must be a positive integer, got {value!r}")
        if self.max_input_len > self.max_seq_len:
            raise PresetError(
                f"{origin}: build.max_input_len ({self.max_input_len}) exceeds build.max_seq_len ({self.max_seq_len})")


@dataclass(frozen=True, slots=True)
class ModelPreset:
    name: str
    family: str
    source: str
    hf_config: dict[str, Any]
    build: BuildSettings
    seed: int = 0
    init_std: float = 0.02
    tokenizer: str = "offline"
    hub_id: str | None = None
    revision: str | None = None
    gguf_package: str | None = None    # source 'gguf': the installed distribution holding the file
    gguf_file: str | None = None       # its path inside the distribution (as importlib.metadata lists it)
    preprocessing: dict[str, Any] | None = None     # vision-language families only
    origin: str = field(default="", compare=False)

    @property
    def architecture(self) -> str:
        return ARCHITECTURES[self.family]

    @property
    def is_vision_language(self) -> bool:
        return self.family in VL_FAMILIES


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def is_preset(name: str) -> bool:
    return (PRESETS_DIR / f"{name}.yaml").is_file()


def load_preset(name: str) -> ModelPreset:
    path = PRESETS_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise PresetError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PresetError(f"{path}: invalid YAML ({exc.__class__.__name__})") from None
    return preset_from_dict(data, origin=str(path))


def preset_from_dict(data: Any, origin: str) -> ModelPreset:
    if not isinstance(data, dict):
        raise PresetError(f"{origin}: expected a mapping at the top level")
    for key in ("name", "family", "source", "hf_config"):
        if key not in data:
            raise PresetError(f"{origin}: missing key {key!r}")
    checks = (("family", FAMILIES), ("source", SOURCES), ("tokenizer", TOKENIZERS))
    for key, allowed in checks:
        value = data.get(key, "offline" if key == "tokenizer" else None)
        if value not in allowed:
            raise PresetError(f"{origin}: {key} must be one of {allowed}, got {value!r}")
    if data["source"] == "hub" and not data.get("hub_id"):
        raise PresetError(f"{origin}: source 'hub' needs hub_id")
    if data["source"] == "gguf" and not (data.get("gguf_package") and data.get("gguf_file")):
        raise PresetError(f"{origin}: source 'gguf' needs gguf_package and gguf_file")
    build_data = data.get("build") or {}
    unknown = set(build_data) - set(BuildSettings.__dataclass_fields__)
    if unknown:
        raise PresetError(f"{origin}: unknown build keys {sorted(unknown)}")
    build = BuildSettings(**build_data)
    build.validate(origin)
    preprocessing = _preprocessing(data, origin)
    return ModelPreset(
        name=str(data["name"]), family=data["family"], source=data["source"],
        hf_config=dict(data["hf_config"]), build=build, seed=int(data.get("seed", 0)),
        init_std=float(data.get("init_std", 0.02)), tokenizer=data.get("tokenizer", "offline"),
        hub_id=data.get("hub_id"), revision=data.get("revision"), gguf_package=data.get("gguf_package"),
        gguf_file=data.get("gguf_file"), preprocessing=preprocessing, origin=origin)


def _preprocessing(data: dict[str, Any], origin: str) -> dict[str, Any] | None:
    value = data.get("preprocessing")
    family = build_family_for(data["family"])
    if family is None:
        if value is not None:
            raise PresetError(f"{origin}: preprocessing is only for the families {VL_FAMILIES}")
        return None
    keys = family.preprocessing_keys      # the image-processor parameters (vision/config.json "preprocessing")
    if not isinstance(value, dict):
        raise PresetError(f"{origin}: family {data['family']!r} needs a preprocessing mapping "
                          f"({', '.join(keys)})")
    missing = [k for k in keys if k not in value]
    unknown = sorted(set(value) - set(keys))
    if missing or unknown:
        raise PresetError(f"{origin}: preprocessing: missing keys {missing}, unknown keys {unknown}")
    for key in ("image_mean", "image_std"):
        if key in keys and not (isinstance(value[key], list) and len(value[key]) == 3):
            raise PresetError(f"{origin}: preprocessing.{key} must be a list of 3 numbers, got {value[key]!r}")
    if "min_pixels" in keys and not 0 < value["min_pixels"] <= value["max_pixels"]:
        raise PresetError(f"{origin}: preprocessing.min_pixels ({value['min_pixels']}) must be positive and "
                          f"at most max_pixels ({value['max_pixels']})")
    return dict(value)
