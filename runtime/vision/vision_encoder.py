"""Vision encoders: patches of one or more images in, image embeddings out.

What it is for: the `VisionEncoder` protocol the executor calls, its PyTorch
implementation (the family's `forward` over vision/encoder.safetensors) and
its ONNX Runtime implementation (vision/encoder.onnx, or the int8 Q/DQ vision/encoder.int8.onnx
when the build wrote one; CPU provider), and
`load_vision_encoder`, which picks one ("auto": `auto_backend`: PyTorch on CUDA;
on the CPU ONNX Runtime for int8 graphs, else the family's choice). Both take
the same host-side inputs, the family's `encoder_feed` (runtime/families/),
whatever the family.
Not for: preprocessing images, caching embeddings or batching across requests.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from engine_format.errors import EngineLoadError
from engine_format.vision_config import VisionConfig
from runtime.families import vision_family
from runtime.families.base import Grid

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine

BACKENDS = ("auto", "pytorch", "onnxruntime")
# A tower whose graph (with its .data file) is below this runs on one ONNX Runtime thread. Its calls are short
# (tiny-qwen2-vl: one 224x224 image per call, 1.9 ms, mostly per-node overhead): a second thread measured no
# faster (1.97 vs 1.90 ms per image, 2.20 vs 1.76 ms of CPU, under load 7) and, served on 2 cores, waits for
# the front end's core. Larger towers get torch's thread count, as before (issue 13: encoder vs LLM cores).
SMALL_GRAPH_BYTES = 16 << 20


class VisionEncoder(Protocol):
    def encode(self, pixel_values: torch.Tensor, grid_thws: list[Grid]) -> torch.Tensor:
        """The visuals' pixel_values (concatenated along axis 0) and grids -> [sum num_tokens, out_hidden_size]
        float32, rows in input order."""
        ...


class VisionBackendError(RuntimeError):
    """A vision backend is unknown or cannot run here; the message says what to install or choose."""


class TorchVisionEncoder:
    """The tower in PyTorch; computes in the weights' dtype (or `dtype`), returns float32."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None = None) -> None:
        self.cfg = cfg
        self.family = vision_family(cfg)
        self.device = device
        self.weights = {name: t.to(device=device, dtype=dtype or t.dtype) for name, t in weights.items()}

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thws: list[Grid]) -> torch.Tensor:
        feed = self.family.encoder_feed(pixel_values, grid_thws)
        feed = {name: t.to(self.device) for name, t in feed.items()}
        return self.family.forward(self.weights, feed, segmented=True).float()


class OnnxVisionEncoder:
    """vision/encoder.onnx on ONNX Runtime's CPU provider."""

    def __init__(self, onnx_path: str, cfg: VisionConfig, num_threads: int = 0,
                 max_patches_per_call: int | None = None) -> None:
        ort = import_onnxruntime()
        self.cfg = cfg
        self.family = vision_family(cfg)
        self.max_patches_per_call = max_patches_per_call or self.family.max_patches_per_onnx_call
        self.onnx_path = onnx_path
        self.num_threads = num_threads or default_threads(onnx_path)
        self.session = ort.InferenceSession(onnx_path, session_options(self.num_threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, pixel_values: torch.Tensor, grid_thws: list[Grid]) -> torch.Tensor:
        self.family.encoder_feed(pixel_values, grid_thws)       # checks the whole call before any group runs
        pixel_values = pixel_values.detach().to("cpu", torch.float32)
        # axis 0 holds a fixed number of patches per row in every family's layout: one (Qwen's patch rows) or
        # a whole tile (InternVL, LLaVA: [tiles, 3, S, S]), so a group's rows are in proportion to its patches
        rows, patches = pixel_values.shape[0], _num_patches(grid_thws)
        outputs, start = [], 0
        for group in _groups(grid_thws, self.max_patches_per_call):
            count = _num_patches(group) * rows // patches
            outputs.append(self._run(pixel_values[start:start + count], group))
            start += count
        return torch.cat(outputs)

    def _run(self, pixel_values: torch.Tensor, grids: list[Grid]) -> torch.Tensor:
        feed = self.family.encoder_feed(pixel_values, grids)
        (out,) = self.session.run(None, {name: feed[name].contiguous().numpy() for name in self.input_names})
        return torch.from_numpy(out)


def _num_patches(grids: Sequence[Grid]) -> int:
    return sum(t * h * w for t, h, w, *_ in grids)


def _groups(grid_thws: Sequence[Grid], max_patches: int) -> list[list[Grid]]:
    """Consecutive visuals, packed greedily up to max_patches per group (a visual is never split)."""
    groups: list[list[Grid]] = [[]]
    for grid in grid_thws:
        if groups[-1] and _num_patches(groups[-1]) + _num_patches([grid]) > max_patches:
            groups.append([])
        groups[-1].append(tuple(grid))
    return groups


def import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise VisionBackendError("the onnxruntime vision backend needs the 'onnxruntime' package "
                                 "(pip install onnxruntime), or choose the pytorch backend") from None
    return onnxruntime


def default_threads(onnx_path: str) -> int:
    """ONNX Runtime intra-op threads for a graph: 1 below SMALL_GRAPH_BYTES (graph plus its .data file),
    else torch's thread count."""
    graph = Path(onnx_path)
    data = graph.with_name(graph.name + ".data")
    size = graph.stat().st_size + (data.stat().st_size if data.is_file() else 0)
    return 1 if size < SMALL_GRAPH_BYTES else torch.get_num_threads()


def session_options(num_threads: int = 0) -> Any:
    """CPU session options (REFERENCE.md section 4: keep Q/DQ nodes unfused, or int8 drifts and fp8 fails).

    The encoder runs on the engine core's thread between LLM forwards, so it gets `num_threads` (0: torch's
    thread count; OnnxVisionEncoder passes `default_threads`) and its threads do not spin after a run: spinning
    ORT threads would take the cores from the LLM's next forward (issue 13: encoder and LLM must not fight
    for cores)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def onnx_graph_path(engine: "LoadedEngine") -> Path:
    """The graph the onnxruntime backend runs: vision/encoder.int8.onnx when the build wrote one
    (`--vision-quant int8`, issue 14), else the float vision/encoder.onnx. The pytorch backend stays float."""
    assert engine.vision is not None
    return engine.vision.onnx_int8_path or engine.vision.onnx_path


def auto_backend(engine: "LoadedEngine", device: torch.device) -> str:
    """What "auto" runs: PyTorch on CUDA; on the CPU ONNX Runtime for an int8 vision graph (the validated
    int8 path runs only there), else the family's `cpu_vision_backend` (Qwen2-VL: PyTorch, whose tower batches
    same-size images in one call where the ONNX graph's [N, N] mask cannot; LLaVA, InternVL: ONNX Runtime)."""
    assert engine.vision is not None
    if device.type == "cuda":
        return "pytorch"
    if engine.vision.onnx_int8_path is not None:
        return "onnxruntime"
    return vision_family(engine.vision.config).cpu_vision_backend


def load_vision_encoder(engine: "LoadedEngine", backend: str = "auto",
                        device: torch.device = torch.device("cpu")) -> VisionEncoder:
    if engine.vision is None:
        raise VisionBackendError(f"engine {engine.name!r} has no vision tower")
    if backend not in BACKENDS:
        raise VisionBackendError(f"vision backend {backend!r} is unknown ({', '.join(BACKENDS)})")
    if backend == "auto":
        backend = auto_backend(engine, device)
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise VisionBackendError(f"the onnxruntime vision backend runs on the CPU, not {device}")
        path = onnx_graph_path(engine)
        try:
            return OnnxVisionEncoder(str(path), engine.vision.config)
        except VisionBackendError:
            raise
        except Exception as exc:  # ONNX Runtime's own errors (InvalidProtobuf, Fail, ...) name no file
            rel = path.resolve().relative_to(engine.root.resolve()).as_posix()
            first_line = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
            raise EngineLoadError(rel, f"ONNX Runtime cannot load it ({first_line})") from None
    # float16 / bfloat16 matmuls are slow or missing on CPU: compute there in float32.
    dtype = None if device.type == "cuda" else torch.float32
    return TorchVisionEncoder(engine.vision.config, engine.vision.load_weights(), device, dtype)
