"""What a vision-language family provides to the builder (docs/design/families.md).

What it is for: the `BuildFamily` protocol through which the generic build
stages (source resolution, LLM conversion, the vision convert / export /
validate stages, random checkpoints for `tiny-*` presets) do everything that
depends on the family's Hugging Face checkpoint: config fields, tensor names of
both hub layouts, the reference tower, the preprocessor and tokenizer files;
the LLM layouts shared by the families whose LLM sits inside a wrapper model, and
the rule that picks a family's preprocessing parameters (checkpoint file, else preset).
Not for: any family's mapping (builder/families/<family>.py), the registry
(builder/families/__init__.py) or the engine-directory schema (engine_format/families/).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from builder.convert import ConversionError
from engine_format.vision_config import VisionConfig


PREPROCESSOR_FILE = "preprocessor_config.json"
GridSets = tuple[tuple[tuple[int, ...], ...], ...]     # validation feeds: grid sets, one per encoder call


@dataclass(frozen=True, slots=True)
class LLMKeys:
    """Where the language model's tensors sit in an HF checkpoint."""

    prefix: str            # of the decoder tensors: "model.", "model.language_model.", "language_model.model."
    lm_head: str           # the output projection: "lm_head.weight", "language_model.lm_head.weight"


# the LLM inside a wrapper model (InternVL, LLaVA): transformers' current layout, then its older one
WRAPPED_LLM_LAYOUTS = (LLMKeys("model.language_model.", "lm_head.weight"),
                       LLMKeys("language_model.model.", "language_model.lm_head.weight"))


def wrapped_llm_keys(hf_names: Collection[str], family: str) -> LLMKeys:
    """The first of WRAPPED_LLM_LAYOUTS that some tensor name starts with; ConversionError naming both."""
    for keys in WRAPPED_LLM_LAYOUTS:
        if any(name.startswith(keys.prefix) for name in hf_names):
            return keys
    raise ConversionError(f"HF checkpoint holds no {family} language model tensors "
                          f"({' or '.join(k.prefix + '*' for k in WRAPPED_LLM_LAYOUTS)})")


def preprocessing_params(hf_dir: Path, preset: dict[str, Any] | None,
                         from_file: Callable[[Path, dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """A family's `preprocessing` block: the checkpoint's preprocessor_config.json wins (`from_file` maps its
    path and raw JSON to the family's fields), else a copy of the preset's block; ConversionError when neither."""
    path = hf_dir / PREPROCESSOR_FILE
    if path.is_file():
        return from_file(path, json.loads(path.read_text()))
    if preset is None:
        raise ConversionError(f"{hf_dir}: no {PREPROCESSOR_FILE} and no preset preprocessing parameters")
    return dict(preset)


@dataclass(frozen=True, slots=True)
class HFTower:
    """transformers' tower (+ projector) as the parity reference of builder/validate_vision.py."""

    inputs: tuple[tuple[str, Any, tuple[int, ...]], ...]   # (feed name, numpy dtype, shape; -1 dynamic)
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor]   # feed -> rows in the LLM's order


@dataclass(frozen=True, slots=True)
class OfflineTokens:
    """The offline tokenizer of a family's tiny presets: its special tokens and chat template."""

    special_tokens: tuple[str, ...]
    chat_template: str


class BuildFamily(Protocol):
    @property
    def name(self) -> str: ...                          # the family (engine_format schema family)

    @property
    def hf_architectures(self) -> dict[str, str]: ...   # HF config model_type -> HF class name

    @property
    def preprocessing_keys(self) -> tuple[str, ...]: ...  # the keys a preset's `preprocessing:` states

    @property
    def special_tokens(self) -> dict[str, str]: ...     # HF config key -> token text (random checkpoints)

    @property
    def validation_grids(self) -> GridSets | Callable[[VisionConfig], GridSets]: ...
        # parity feeds, one grid set per call; a callable where the grids depend on the parsed config

    @property
    def offline_tokenizer(self) -> OfflineTokens | None: ...   # None: the shared offline tokenizer

    def llm_architecture(self, hf_config: dict[str, Any]) -> str:
        """The `llm/config.json` architecture for this checkpoint."""
        ...

    def text_config(self, hf_config: dict[str, Any]) -> dict[str, Any]:
        """The language model's HF config fields."""
        ...

    def llm_keys(self, hf_names: Collection[str]) -> LLMKeys:
        """The LLM's tensor names in either hub layout; ConversionError when neither matches."""
        ...

    def vision_config_json(self, hf_dir: Path, dtype: str, preset_preprocessing: dict[str, Any] | None
                           ) -> dict[str, Any]:
        """The `vision/config.json` object (HF defaults resolved; preprocessor_config.json wins over the preset)."""
        ...

    def vision_tensors(self, hf: Mapping[str, torch.Tensor], cfg: VisionConfig) -> dict[str, torch.Tensor]:
        """Engine names (the schema's tensor_shapes keys) -> the HF tensors; ConversionError naming the tensor.
        The generic stage checks missing / unexpected names and shapes and casts to cfg.dtype."""
        ...

    def hf_preprocessor_config(self, preprocessing: dict[str, Any]) -> dict[str, Any]:
        """The `preprocessor_config.json` a random checkpoint gets."""
        ...

    def hf_tower(self, hf_dir: Path, cfg: VisionConfig) -> HFTower:
        """transformers' tower with the checkpoint's tensors rounded to cfg.dtype, computing in float32."""
        ...

    def transformers_checkpoint(self, hf_dir: Path, cache_dir: Path) -> Path:
        """hf_dir, or for a hub layout transformers cannot load (InternVL's OpenGVLab original) a copy in
        transformers' own layout made once under cache_dir: what the build and its validation read."""
        ...
