"""Quantized vision-language engines (issue 14): a tiny Qwen2-VL engine quantized (SmoothQuant W8A8, int8 KV
cache, int8 Q/DQ vision graph) with a calibration JSONL holding images (a relative path and a data: URL) builds,
validates with image prompts, and its greedy tokens with an image through the runtime's EngineCore equal one
sequence through the quantized model (the server's APIs over EngineCore are tests/grpc_service's); the int8
vision graph passes its polygraphy tolerance, is the one the runtime's ONNX Runtime backend runs, and a broken
one fails the check; that engine and an int8 weight-only one are served through the native API (chat with an
image) and the KServe ensemble (image pixels) with greedy output equal to the in-process quantized EngineCore;
bad input is refused in one line naming the flag, before any work."""
from __future__ import annotations

import base64
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from builder.calib_data import read_calib_samples
from builder.calib_images import generated_image
from builder.cli import main
from builder.pipeline import BuildRequest, build_engine
from builder.progress import Progress
from builder.quantize import QuantRequest
from builder.quantize_validate_vl import encode_rows, make_prompt, mm_greedy
from builder.vision_quant import INT8_PAIR, INT8_TOLERANCE, validate_vision_int8
from engine_format.engine_dir import EngineLoadError, load_engine
from grpc_service.client import NativeClient, TritonClient, chat_message, image_proto
from runtime.config import EngineConfig
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.executor.model import DecoderModel
from runtime.multimodal.image_io import ImageLimits
from runtime.multimodal.processor import MultimodalProcessor
from runtime.vision.vision_encoder import OnnxVisionEncoder, load_vision_encoder
from tests.helpers import media
from tests.helpers.engine_helpers import greedy
from tests.helpers.grpc_fixtures import IMAGE_BLOCK, VL_GREEDY, VL_SERVER_ARGS, ServerProcess, VLReference

PRESET = "tiny-qwen2-vl"
NUM_IMAGES = 3          # in the calibration JSONL below


def _png(index: int) -> bytes:
    buf = io.BytesIO()
    generated_image(index, seed=123).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("vl-quant")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(_png(0))
    (root / "images" / "b.png").write_bytes(_png(1))
    data_url = "data:image/png;base64," + base64.b64encode(_png(2)).decode()
    records = [{"text": "What is in this picture?", "image": "images/a.png"},
               {"text": "The river runs past the old mill."},
               {"text": "Compare the two pictures.", "images": ["images/b.png", data_url]},
               {"text": "A paged key-value cache splits each sequence into blocks."}]
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = build_engine(BuildRequest(model=PRESET, output=root / "w8a8sq", cache_dir=cache_dir,
                                       quant=QuantRequest("w8a8_sq", "int8", calib, 8, False, "int8")),
                          Progress(6, enabled=False))
    assert result.validation is not None and result.validation["passed"], result.validation
    return result.output


def test_build_calibrates_with_images_and_validates_image_prompts(engine_dir: Path) -> None:
    manifest = json.loads((engine_dir / "engine.json").read_text())
    calibration = manifest["quantization"]["calibration"]
    assert calibration["num_images"] == NUM_IMAGES and calibration["num_samples"] == 4
    assert "encoder.int8.onnx" in calibration["images"]     # the LLM saw the embeddings serving computes
    assert manifest["components"]["vision"]["onnx_int8"] == "vision/encoder.int8.onnx"
    assert manifest["vision_quantization"]["num_quantize_linear"] > 0
    quant = json.loads((engine_dir / "llm" / "config.json").read_text())["quantization"]
    assert (quant["quant_algo"], quant["kv_cache_quant_algo"]) == ("W8A8_SQ_PER_CHANNEL", "INT8")
    report = json.loads((engine_dir / "validation.json").read_text())
    images = report["image_prompts"]
    assert images["num_prompts"] >= 3 and images["num_image_rows"] > 0 and images["positions"] > 100
    assert images["vision_graph"]["engine"].startswith("vision/encoder.int8.onnx")
    assert report["kl_divergence"] <= report["tolerance"]["max_kl"] and report["passed"]
    pair = report["vision"]["pairs"][INT8_PAIR]
    assert pair["passed"] and pair["tolerance"]["max_abs_err_over_scale"] == INT8_TOLERANCE
    assert 0 < pair["max_rel_err"] <= INT8_TOLERANCE        # int8 is not float: the error is real and bounded


def test_runtime_runs_the_int8_graph(engine_dir: Path) -> None:
    """The onnxruntime backend loads encoder.int8.onnx; its rows differ from the float graph's by int8's error;
    the pytorch backend stays float."""
    engine = load_engine(engine_dir)
    processor = MultimodalProcessor(engine, _tokenizer(engine), ImageLimits())
    _, mm = make_prompt(processor, generated_image(5, seed=99), "Describe this image.")
    served = load_vision_encoder(engine, "onnxruntime")
    assert Path(served.onnx_path).name == "encoder.int8.onnx"
    (int8_rows,) = encode_rows(served, mm)
    (float_rows,) = encode_rows(OnnxVisionEncoder(str(engine.vision.onnx_path), engine.vision.config), mm)
    (torch_rows,) = encode_rows(load_vision_encoder(engine, "pytorch"), mm)
    scale = max(1.0, float(float_rows.abs().max()))
    assert 1e-4 < float((int8_rows - float_rows).abs().max()) / scale <= INT8_TOLERANCE
    assert float((torch_rows - float_rows).abs().max()) / scale < 1e-5


def test_served_greedy_with_an_image_matches_quantized_reference(engine_dir: Path) -> None:
    """EngineCore (scheduler, encoder cache, a text request batched beside it) against one sequence through the
    quantized model with the int8 tower's rows."""
    engine = load_engine(engine_dir)
    tokenizer = _tokenizer(engine)
    processor = MultimodalProcessor(engine, tokenizer, ImageLimits())
    prompt, mm = make_prompt(processor, generated_image(6, seed=99), "What is the largest shape?")
    rows = encode_rows(load_vision_encoder(engine, "onnxruntime"), mm)
    model = DecoderModel(engine.llm_config, engine.weights, torch.device("cpu"))
    expected = mm_greedy(model, prompt, rows, 12, engine.build.tokens_per_block)
    core = EngineCore(engine, EngineConfig(enable_prefix_caching=False))
    text_ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    outputs = core.generate_all([EngineRequest("image", prompt.token_ids, greedy(12), multimodal=mm),
                                 EngineRequest("text", text_ids, greedy(12))])
    assert collect_text(outputs["image"])[1] == expected


def test_broken_int8_graph_fails_the_polygraphy_check(engine_dir: Path, tmp_path: Path) -> None:
    """The per-channel scales of the weight of the graph's last Gemm (the projector's output) doubled: the int8
    pair fails its tolerance."""
    import onnx
    from onnx import numpy_helper

    copy = tmp_path / "engine"
    shutil.copytree(engine_dir, copy)
    path = copy / "vision" / "encoder.int8.onnx"
    model = onnx.load(str(path))
    inits = {init.name: init for init in model.graph.initializer}
    last_gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    (weight_dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == last_gemm.input[1]]
    assert numpy_helper.to_array(inits[weight_dq.input[0]]).dtype == np.int8
    scale = inits[weight_dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    onnx.save(model, str(path))
    report = validate_vision_int8(load_engine(copy, verify_checksums=False), path)
    assert not report["passed"] and report["max_rel_err"] > INT8_TOLERANCE
    path.unlink()              # listed in engine.json but gone: the loader names it
    with pytest.raises(EngineLoadError, match=r"vision/encoder\.int8\.onnx: missing \(listed in engine.json"):
        load_engine(copy, verify_checksums=False)


@pytest.fixture(scope="module")
def int8wo_engine_dir(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """int8 weight-only in bf16 (the mode's fast CPU path), float vision tower, 4 bundled calibration samples.
    Not validated here (this engine is for serving; the image-prompt validation runs on `engine_dir`)."""
    return build_engine(BuildRequest(model=PRESET, output=tmp_path_factory.mktemp("vl-int8wo") / "int8wo",
                                     dtype="bf16", validate=False, cache_dir=cache_dir,
                                     quant=QuantRequest("int8_wo", None, None, 4)), Progress(6, enabled=False)).output


@pytest.fixture(scope="module")
def quant_server(engine_dir: Path, int8wo_engine_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for both engines (models "w8a8sq" and "int8wo"), the default (onnxruntime) vision backend."""
    process = ServerProcess.start(["--engine", str(engine_dir), "--engine", str(int8wo_engine_dir),
                                   *VL_SERVER_ARGS, "--no-warmup"], tmp_path_factory.mktemp("vl-quant-logs"))
    yield process
    process.stop()


@pytest.mark.parametrize("name", ["w8a8sq", "int8wo"])
def test_quantized_vl_engine_served_through_both_apis(engine_dir: Path, int8wo_engine_dir: Path,
                                                      quant_server: ServerProcess, name: str) -> None:
    """Native chat with an image and the ensemble with image pixels give the greedy output of EngineCore on the
    same quantized engine in this process (its onnxruntime tower: encoder.int8.onnx for w8a8sq)."""
    directory = {"w8a8sq": engine_dir, "int8wo": int8wo_engine_dir}[name]
    assert (load_engine(directory).vision.onnx_int8_path is not None) == (name == "w8a8sq")
    reference = VLReference(directory)
    png = media.gradient_png(seed=7)
    expected_text, expected_ids = reference.greedy(reference.chat({"type": "image", "image": png},
                                                                  {"type": "text", "text": "Describe it."}))
    with NativeClient(quant_server.target, timeout_s=120) as native:
        completion = native.chat([chat_message("user", image_proto(png), "Describe it.")], VL_GREEDY, model=name)
    assert completion.token_ids == expected_ids and completion.text == expected_text
    pixels = np.asarray(media.gradient(56, 40, seed=8))
    text = f"{IMAGE_BLOCK}What is the largest shape?"
    expected_text, _ = reference.greedy(reference.processor.process_text(text, [Image.fromarray(pixels)]))
    with TritonClient(quant_server.target, model=f"{name}_ensemble", timeout_s=120) as triton:
        assert triton.generate(text, VL_GREEDY, images=[pixels]) == expected_text


def test_bundled_vl_calibration_set() -> None:
    """Without --calib-data a VL build calibrates on generated images interleaved with the bundled texts; the
    pixels are the same every time; a text model gets the texts only."""
    first, again = read_calib_samples(None, 32, True), read_calib_samples(None, 32, True)
    assert len(first) == 32 and [s.digest() for s in first] == [s.digest() for s in again]
    with_images = [s for s in first if s.images]
    assert len(with_images) >= 8 and first[0].images and not first[1].images
    assert len({s.images[0].size for s in with_images}) > 4            # several sizes
    assert not any(s.images for s in read_calib_samples(None, 32, False))


def _tokenizer(engine):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))


def _cli_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path, model: str, *flags: str) -> str:
    out = tmp_path / "engine"
    code = main(["--model", model, "--output", str(out), "--cache-dir", str(cache_dir), "--quiet", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists(), err
    errors = [line for line in err.splitlines() if "error" in line]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def test_bad_vision_quant_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--model", PRESET, "--vision-quant", "int4"])
    assert exc.value.code == 2 and "--vision-quant" in capsys.readouterr().err
    assert "--vision-quant: the model is a text model" in _cli_error(capsys, tmp_path, cache_dir, "tiny-qwen2",
                                                                      "--vision-quant", "int8")
    texts = tmp_path / "texts.jsonl"
    texts.write_text('{"text": "no pictures here"}\n')
    assert "--vision-quant: the first 32 samples of --calib-data hold no images" in _cli_error(
        capsys, tmp_path, cache_dir, PRESET, "--vision-quant", "int8", "--calib-data", str(texts))
    assert "--export-hf: not written for vision-language engines" in _cli_error(
        capsys, tmp_path, cache_dir, PRESET, "--quant", "fp8", "--export-hf")


@pytest.mark.parametrize(("record", "reason"), [
    ({"text": "a", "image": "missing.png"}, "line 1: image 'missing.png' is not a file"),
    ({"text": "a", "image": "data:image/png;base64,@@@"}, "line 1: the data: URL holds invalid base64"),
    ({"text": "a", "image": "data:text/plain;base64,aGk="}, "line 1: a data: URL must look like data:image/"),
    ({"text": "a", "image": "data:image/png;base64,aGVsbG8="}, "line 1: image data: URL cannot be decoded"),
    ({"text": "a", "images": []}, 'line 1: "images" must be a non-empty list'),
    ({"text": "a", "image": 3}, "line 1: an image must be a non-empty string"),
])
def test_bad_calibration_images(capsys: pytest.CaptureFixture[str], tmp_path: Path, cache_dir: Path,
                                record: dict, reason: str) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps(record) + "\n")
    err = _cli_error(capsys, tmp_path, cache_dir, PRESET, "--quant", "int8_wo", "--calib-data", str(data))
    assert err.startswith("trtserve-build: error: --calib-data:") and reason in err
