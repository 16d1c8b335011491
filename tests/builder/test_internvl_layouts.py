"""An InternVL2.5 checkpoint in OpenGVLab's original layout builds to the same engine as transformers' layout.

The tiny preset's checkpoint (transformers' -hf layout) is rewritten by hand in OpenGVLab's layout
(tests/helpers/internvl_helpers.py: `InternVLChatModel` config with `llm_config`, `vision_model.*` with a fused
qkv, `mlp1.*`, CLIP-style preprocessor_config.json). Source resolution converts it once into transformers'
layout (which transformers then loads: the same tensors as the original), and the engine built from it holds
bit-identical LLM and vision tensors and the same vision/config.json as the preset's engine.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from builder.source import resolve_source
from tests.conftest import hf_dir_of
from tests.helpers.internvl_helpers import write_opengvlab_checkpoint


def test_opengvlab_layout_builds_the_same_engine(build_tiny, cache_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText

    reference = build_tiny("tiny-internvl2.5")
    original = hf_dir_of(reference)
    opengvlab = write_opengvlab_checkpoint(original, tmp_path / "opengvlab")
    source = resolve_source(str(opengvlab), cache_dir)
    assert (source.family, source.architecture) == ("internvl", "InternVLForConditionalGeneration")
    converted = AutoModelForImageTextToText.from_pretrained(str(source.hf_dir)).state_dict()
    want = AutoModelForImageTextToText.from_pretrained(str(original)).state_dict()
    assert sorted(converted) == sorted(want) and all(torch.equal(converted[k], want[k]) for k in want)

    out = tmp_path / "engine"
    build_engine(BuildRequest(model=str(opengvlab), output=out, dtype="fp32", cache_dir=cache_dir, validate=False),
                 Progress(6, enabled=False))
    for rel in ("llm/rank0.safetensors", "vision/encoder.safetensors"):
        ours, theirs = load_file(str(out / rel)), load_file(str(reference / rel))
        assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), rel
    assert json.loads((out / "vision/config.json").read_text()) == json.loads(
        (reference / "vision/config.json").read_text())
