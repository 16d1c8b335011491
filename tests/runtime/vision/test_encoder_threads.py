"""ONNX Runtime threads of the vision encoder: one for a small tower, torch's count for a large one (its
graph plus the external .data file), and an explicit count wins."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from runtime.vision.vision_encoder import SMALL_GRAPH_BYTES, default_threads


def test_small_graph_gets_one_thread_large_one_torchs(tmp_path: Path) -> None:
    graph = tmp_path / "encoder.onnx"
    graph.write_bytes(b"\0" * 1024)
    assert default_threads(str(graph)) == 1
    with (tmp_path / "encoder.onnx.data").open("wb") as data:    # sparse: the size is what counts
        data.truncate(SMALL_GRAPH_BYTES)
    assert default_threads(str(graph)) == torch.get_num_threads()
    other = tmp_path / "encoder.int8.onnx"                          # another graph's .data is not this one's
    other.write_bytes(b"\0" * 1024)
    assert default_threads(str(other)) == 1


def test_encoder_session_uses_the_default_or_the_given_count(build_tiny: Callable[..., Path]) -> None:
    from engine_format.engine_dir import load_engine
    from runtime.vision.vision_encoder import OnnxVisionEncoder, onnx_graph_path

    engine = load_engine(build_tiny("tiny-qwen2-vl"))      # the session's build, shared with the VL tests
    path = str(onnx_graph_path(engine))
    assert OnnxVisionEncoder(path, engine.vision.config).num_threads == 1
    encoder = OnnxVisionEncoder(path, engine.vision.config, num_threads=2)
    assert encoder.num_threads == 2 and encoder.session.get_session_options().intra_op_num_threads == 2
