"""Vision encoders: patches of one or more images in, image embeddings out.

What it is for: the `VisionEncoder` protocol the executor calls, its PyTorch
implementation (runtime/vision/vision_model.py over vision/encoder.safetensors) and
its ONNX Runtime implementation (vision/encoder.onnx, CPU provider), and
`load_vision_encoder`, which picks one ("auto": ONNX Runtime on CPU, PyTorch
on CUDA). Both take the same host-side inputs (runtime/vision/vision_inputs.py).
Not for: preprocessing images, caching embeddings or batching across requests.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch

from runtime.errors import FieldError
from engine_format.errors import EngineLoadError
from engine_format.vision_config import MAX_PATCHES_PER_ONNX_CALL, VisionConfig
from runtime.vision.vision_inputs import GridTHW, num_patches, vision_inputs
from runtime.vision.vision_model import vision_forward

if TYPE_CHECKING:
    from engine_format.engine_dir import LoadedEngine

BACKENDS = ("auto", "pytorch", "onnxruntime")


class VisionEncoder(Protocol):
    def encode(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        """[sum t*h*w, C*T*P*P] float32 -> [sum num_tokens, out_hidden_size] float32, rows in input order."""
        ...


class VisionBackendError(RuntimeError):
    """A vision backend is unknown or cannot run here; the message says what to install or choose."""


def check_pixel_values(pixel_values: torch.Tensor, grid_thws: Sequence[GridTHW], cfg: VisionConfig) -> None:
    want = (num_patches(grid_thws), cfg.patch_dim)
    if pixel_values.dim() != 2 or tuple(pixel_values.shape) != want:
        raise FieldError("pixel_values", f"expected shape {list(want)} for grids {list(grid_thws)}, "
                         f"got {list(pixel_values.shape)}")
    if not pixel_values.is_floating_point():
        raise FieldError("pixel_values", f"expected a floating-point tensor, got {pixel_values.dtype}")


class TorchVisionEncoder:
    """The tower in PyTorch; computes in the weights' dtype (or `dtype`), returns float32."""

    def __init__(self, cfg: VisionConfig, weights: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.weights = {name: t.to(device=device, dtype=dtype or t.dtype) for name, t in weights.items()}

    @torch.inference_mode()
    def encode(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        check_pixel_values(pixel_values, grid_thws, self.cfg)
        inputs = vision_inputs(grid_thws, self.cfg)
        move = lambda t: None if t is None else t.to(self.device)   # noqa: E731
        out = vision_forward(self.cfg, self.weights, pixel_values.to(self.device), move(inputs.position_ids),
                             move(inputs.cu_seqlens), move(inputs.window_index), move(inputs.cu_window_seqlens))
        return out.float()


class OnnxVisionEncoder:
    """vision/encoder.onnx on ONNX Runtime's CPU provider."""

    def __init__(self, onnx_path: str, cfg: VisionConfig, num_threads: int = 0,
                 max_patches_per_call: int = MAX_PATCHES_PER_ONNX_CALL) -> None:
        ort = import_onnxruntime()
        self.cfg = cfg
        self.max_patches_per_call = max_patches_per_call
        self.session = ort.InferenceSession(onnx_path, session_options(num_threads),
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def encode(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        check_pixel_values(pixel_values, grid_thws, self.cfg)
        outputs, start = [], 0
        for group in _groups(grid_thws, self.max_patches_per_call):
            count = num_patches(group)
            outputs.append(self._run(pixel_values[start:start + count], group))
            start += count
        return torch.cat(outputs)

    def _run(self, pixel_values: torch.Tensor, grids: list[GridTHW]) -> torch.Tensor:
        inputs = vision_inputs(grids, self.cfg)
        feed = {"pixel_values": pixel_values.detach().to("cpu", torch.float32).contiguous().numpy(),
                "position_ids": inputs.position_ids.numpy(), "cu_seqlens": inputs.cu_seqlens.numpy()}
        if inputs.window_index is not None:
            feed.update(window_index=inputs.window_index.numpy(), cu_window_seqlens=inputs.cu_window_seqlens.numpy())
        (out,) = self.session.run(None, {name: feed[name] for name in self.input_names})
        return torch.from_numpy(out)


def _groups(grid_thws: Sequence[GridTHW], max_patches: int) -> list[list[GridTHW]]:
    """Consecutive images, packed greedily up to max_patches per group (an image is never split)."""
    groups: list[list[GridTHW]] = [[]]
    for grid in grid_thws:
        if groups[-1] and num_patches(groups[-1]) + num_patches([grid]) > max_patches:
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


def session_options(num_threads: int = 0) -> Any:
    """CPU session options (REFERENCE.md section 4: keep Q/DQ nodes unfused, or int8 drifts and fp8 fails).

    The encoder runs on the engine core's thread between LLM forwards, so it gets torch's thread count
    (`num_threads` 0) and its threads do not spin after a run: spinning ORT threads would take the cores
    from the LLM's next forward (issue 13: encoder and LLM must not fight for cores)."""
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def load_vision_encoder(engine: "LoadedEngine", backend: str = "auto",
                        device: torch.device = torch.device("cpu")) -> VisionEncoder:
    if engine.vision is None:
        raise VisionBackendError(f"engine {engine.name!r} has no vision tower")
    if backend not in BACKENDS:
        raise VisionBackendError(f"vision backend {backend!r} is unknown ({', '.join(BACKENDS)})")
    if backend == "auto":
        backend = "pytorch" if device.type == "cuda" else "onnxruntime"
    if backend == "onnxruntime":
        if device.type != "cpu":
            raise VisionBackendError(f"the onnxruntime vision backend runs on the CPU, not {device}")
        try:
            return OnnxVisionEncoder(str(engine.vision.onnx_path), engine.vision.config)
        except VisionBackendError:
            raise
        except Exception as exc:  # ONNX Runtime's own errors (InvalidProtobuf, Fail, ...) name no file
            rel = engine.vision.onnx_path.resolve().relative_to(engine.root.resolve()).as_posix()
            first_line = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:300]
            raise EngineLoadError(rel, f"ONNX Runtime cannot load it ({first_line})") from None
    # float16 / bfloat16 matmuls are slow or missing on CPU: compute there in float32.
    dtype = None if device.type == "cuda" else torch.float32
    return TorchVisionEncoder(engine.vision.config, engine.vision.load_weights(), device, dtype)
