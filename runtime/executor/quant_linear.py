"""The decoder's linear layers for every quantization algorithm, with real low-precision arithmetic.

What it is for: turning the checkpoint tensors of one linear layer (float, or one of
the TensorRT-LLM layouts in engine_format/checkpoint_layout.py) into a callable
`[T, in] -> [T, out]` that runs the low-precision kernel the device has:

| algo                | CPU                                            | CUDA                               |
|---------------------|------------------------------------------------|------------------------------------|
| W8A16               | torch._weight_int8pack_mm                      | Triton W8A16 (plugins/quant_gemm_triton.py) |
| W4A16_AWQ           | torch _weight_int4pack_mm_for_cpu              | Triton W4A16 (same file)           |
| W8A8_SQ_PER_CHANNEL | int8 activations, torch._int_mm (int32 acc)    | torch._int_mm                      |
| FP8                 | weights dequantized once at load; activations  | torch._scaled_mm                   |
|                     | rounded through fp8 with their static scale    |                                    |

Weights are re-laid-out once at load (never per call). A device that lacks the
kernel gets `QuantKernelError` naming the algorithm and the device.
Not for: calibration or packing checkpoints (builder/quantize*.py), the KV cache (kv_quant.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from engine_format.llm_config import LLMConfig
from plugins.registry import cpu_available

FP8_MAX = 448.0
LinearFn = Callable[[torch.Tensor], torch.Tensor]


class QuantKernelError(RuntimeError):
    """The device has no kernel for the engine's quantization algorithm."""

    def __init__(self, algo: str, device: torch.device, reason: str) -> None:
        super().__init__(f"quant_algo {algo}: no kernel on device {device}: {reason}")


# A CPU float linear keeps a contiguous [K, N] copy of its weight where that pays: MKL's GEMM on the
# transposed view of the checkpoint's [N, K] tensor is slower at small weights (single thread, CPU time,
# 16 rows: [64 -> 2056] 47 -> 34 us, [512 -> 768] 570 -> 375, [512 -> 3072] 930 -> 740; 1 row: equal)
# and no faster, at times slower, at large ones ([896 -> 9728], 2 rows: 3.3 -> 4.2 ms). The loaded engine
# keeps the checkpoint's tensor, so a copy costs its bytes: only weights up to COPY_MAX_BYTES are copied
# (tiny-qwen2: all, 0.9 MB; small-qwen2 and qwen2.5-0.5b: none, they go to the kernel below); a weight the
# linear owns (concatenated at load) is re-laid-out up to OWNED_MAX_BYTES, in place of itself.
COPY_MAX_BYTES = 1 << 20
OWNED_MAX_BYTES = 8 << 20
# A float32 CPU weight above SKINNY_MIN_BYTES with rows of at least SKINNY_MIN_K stays [N, K], and decode steps
# of a few sequences run the register-tiled kernel over it (plugins/cpu/skinny_gemm.py: the weight comes from
# memory each step there, and MKL's per-call packing of it is the cost); an owned one is then not re-laid-out
# either. small-qwen2's 1 MiB output projections went to MKL on a copy until the kernel prefetched: in-process
# decode at batch 16, 3 alternating pairs, their 8 calls per step took 1.07 / 0.92 / 0.91 ms there and
# 0.83 / 0.76 / 0.78 in the kernel (prefill, 128-2048 rows: MKL on the copy and on the transposed view within
# 6 %). Short rows keep MKL: tiny-qwen2's [2056, 64] lm_head at 16 rows, 2 threads, 29 us against 56.
SKINNY_MIN_BYTES = 1 << 19
SKINNY_MIN_K = 256


@dataclass(slots=True)
class FloatLinear:
    """y = x W^T + b as the one GEMM `F.linear` runs for a 2-D input (addmm / mm on the transposed
    weight), called directly: no per-call transpose or dispatch layer. `owned`: the weight is this
    linear's own tensor (nothing else holds it), so re-laying it out costs no memory."""

    weight: torch.Tensor           # [N, K] (a view of weight_t where that is a copy)
    bias: torch.Tensor | None
    owned: bool = False
    weight_t: torch.Tensor = field(init=False)      # [K, N]: a contiguous copy on CPU where it pays, else a view
    # float32 CPU weight above SKINNY_MIN_BYTES, rows of SKINNY_MIN_K or more: rows of x (inclusive) that go to
    # plugins/cpu/skinny_gemm
    skinny_rows: tuple[int, int] = field(init=False, default=(1, 0))

    def __post_init__(self) -> None:
        size = self.weight.numel() * self.weight.element_size()
        skinny = (self.weight.is_cpu and self.weight.dtype == torch.float32 and size > SKINNY_MIN_BYTES
                  and self.weight.dim() == 2 and self.weight.shape[1] >= SKINNY_MIN_K
                  and self.weight.is_contiguous() and cpu_available()
                  and (self.bias is None or (self.bias.dtype == torch.float32 and self.bias.is_contiguous())))
        if skinny:
            from plugins.cpu.skinny_gemm import SKINNY_ROWS     # numba: imported only where it runs

            self.skinny_rows = SKINNY_ROWS
        if self.weight.is_cpu and not skinny and size <= (OWNED_MAX_BYTES if self.owned else COPY_MAX_BYTES):
            self.weight_t = self.weight.t().contiguous()
            self.weight = self.weight_t.t()
        else:
            self.weight_t = self.weight.t()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if self.skinny_rows[0] <= x.shape[0] <= self.skinny_rows[1] and x.dtype == torch.float32:
            from plugins.cpu.skinny_gemm import skinny_linear

            return skinny_linear(x, self.weight, self.bias)
        return torch.mm(x, self.weight_t) if self.bias is None else torch.addmm(self.bias, x, self.weight_t)


def concat_float_linears(linears: list[FloatLinear]) -> FloatLinear:
    """One linear whose output is the given ones' outputs side by side (weights concatenated on the output
    dim): one GEMM where the model ran several over the same input (the MLP's gate and up projections)."""
    weight = torch.cat([linear.weight for linear in linears])
    if all(linear.bias is None for linear in linears):
        return FloatLinear(weight, None, owned=True)
    return FloatLinear(weight, torch.cat([linear.bias if linear.bias is not None
                                          else linear.weight.new_zeros(linear.weight.shape[0]) for linear in linears]),
                       owned=True)


@dataclass(slots=True)
class Int8WeightOnlyLinear:
    """W8A16: y = x @ (q * s)^T with q int8 [N, K] and s [N]; the GEMM reads int8 weights."""

    qweight: torch.Tensor          # int8 [N, K]
    scale: torch.Tensor            # [N], activation dtype
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            from plugins.quant_gemm_triton import w8a16_matmul

            out = w8a16_matmul(x, self.qweight, self.scale)
        else:
            out = torch._weight_int8pack_mm(x.contiguous(), self.qweight, self.scale)
        return out if self.bias is None else out + self.bias


@dataclass(slots=True)
class Int4AWQLinear:
    """W4A16_AWQ: y = (x * pre) @ W^T, W = int4 q [N, K] times the scale of its (row, K-group)."""

    prequant: torch.Tensor         # [K]
    group_size: int
    packed: torch.Tensor           # CPU: torch's int4pack layout; CUDA: the checkpoint's int8 [N/2, K]
    scales: torch.Tensor           # CPU: [K/G, N, 2] scales and zeros; CUDA: [N, K/G]
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = (x * self.prequant).contiguous()
        if x.device.type == "cuda":
            from plugins.quant_gemm_triton import w4a16_matmul

            out = w4a16_matmul(x, self.packed, self.scales, self.group_size)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales)
        return out if self.bias is None else out + self.bias


@dataclass(slots=True)
class SmoothQuantLinear:
    """W8A8: x' = x * smoother quantized to int8 with a static per-tensor scale; int8 x int8 -> int32 GEMM;
    the int32 accumulator is scaled by act_scale * weight_scale[n]."""

    prequant: torch.Tensor         # [K]
    act_scale: float
    qweight_t: torch.Tensor        # int8 [K, N] (column-major view of [N, K])
    out_scale: torch.Tensor        # float32 [N] = act_scale * weights_scaling_factor
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_int8(x * self.prequant, self.act_scale)
        rows = xq.shape[0]
        if x.device.type == "cuda" and rows <= 16:      # cuBLAS int8 GEMM needs more than 16 rows
            xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
        acc = torch._int_mm(xq, self.qweight_t)[:rows]
        out = (acc.float() * self.out_scale).to(x.dtype)
        return out if self.bias is None else out + self.bias


@dataclass(slots=True)
class FP8Linear:
    """FP8: activations and weights in float8_e4m3fn with static per-tensor scales."""

    weight: torch.Tensor           # CPU: dequantized [N, K] in the model dtype; CUDA: fp8 [K, N] view
    weight_scale: torch.Tensor     # float32 [1]
    act_scale: torch.Tensor        # float32 [1]
    bias: torch.Tensor | None
    # CPU float32: x rounded through e4m3 in one numba pass, bit-identical to the torch expression below
    # (plugins/cpu/fp8_round.py); None: that expression (five ops, two of them scalar float8 conversions)
    round_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            out = torch._scaled_mm(quantize_fp8(x, self.act_scale), self.weight, scale_a=self.act_scale,
                                   scale_b=self.weight_scale, out_dtype=x.dtype)
        elif self.round_input is not None and x.dtype == torch.float32:
            out = F.linear(self.round_input(x, self.act_scale), self.weight)
        else:
            xq = quantize_fp8(x, self.act_scale)
            out = F.linear(xq.to(x.dtype) * self.act_scale.to(x.dtype), self.weight)
        return out if self.bias is None else out + self.bias


def quantize_int8(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.round(x.float() / scale).clamp_(-128, 127).to(torch.int8)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def build_linears(cfg: LLMConfig, w: dict[str, torch.Tensor], bases: list[str], device: torch.device) -> dict[str, LinearFn]:
    """One callable per linear base name (`transformer.layers.{i}.attention.qkv`, ...)."""
    dtype: torch.dtype = getattr(torch, cfg.dtype)
    algo = cfg.quant_algo
    if algo is not None:
        check_kernel(algo, device)
    out: dict[str, LinearFn] = {}
    for base in bases:
        bias = w.get(f"{base}.bias")
        if algo is None:
            out[base] = FloatLinear(w[f"{base}.weight"], bias)
        elif algo == "W8A16":
            out[base] = Int8WeightOnlyLinear(w[f"{base}.weight"].t().contiguous(),
                                             w[f"{base}.per_channel_scale"].to(dtype), bias)
        elif algo == "W4A16_AWQ":
            out[base] = _int4_linear(w, base, cfg.quant.group_size, dtype, device, bias)
        elif algo == "W8A8_SQ_PER_CHANNEL":
            act = float(w[f"{base}.activation_scaling_factor"])
            out[base] = SmoothQuantLinear(w[f"{base}.prequant_scaling_factor"].to(dtype), act,
                                          w[f"{base}.weight"].t(),
                                          act * w[f"{base}.weights_scaling_factor"].float(), bias)
        elif algo == "FP8":
            out[base] = _fp8_linear(w, base, dtype, device, bias)
        else:
            raise QuantKernelError(algo, device, "unknown algorithm")
    return out


def check_kernel(algo: str, device: torch.device) -> None:
    """Raise QuantKernelError when this torch build / device cannot run `algo`."""
    if device.type == "cpu":
        needed = {"W8A16": "_weight_int8pack_mm", "W4A16_AWQ": "_weight_int4pack_mm_for_cpu",
                  "W8A8_SQ_PER_CHANNEL": "_int_mm", "FP8": "_to_copy"}[algo]
        if not hasattr(torch.ops.aten, needed):
            raise QuantKernelError(algo, device, f"this torch {torch.__version__} has no aten.{needed}")
        return
    if device.type != "cuda":
        raise QuantKernelError(algo, device, "only cpu and cuda devices have quantized kernels")
    major, minor = torch.cuda.get_device_capability(device)
    if algo == "FP8" and (major, minor) < (8, 9):
        raise QuantKernelError(algo, device, f"FP8 GEMMs need compute capability >= 8.9, this GPU is "
                               f"sm_{major}{minor}")
    if algo in ("W8A16", "W4A16_AWQ"):
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise QuantKernelError(algo, device, "the W8A16 / W4A16 GEMMs are Triton kernels; triton is not installed")


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [N/2, K] (row 2i in the low nibble, 2i+1 in the high one; signed) -> int8 [N, K] in [-8, 7]."""
    low = (packed << 4) >> 4                 # arithmetic shifts sign-extend each nibble
    high = packed >> 4
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1])


def _int4_linear(w: dict[str, torch.Tensor], base: str, group: int, dtype: torch.dtype, device: torch.device,
                 bias: torch.Tensor | None) -> Int4AWQLinear:
    scales = w[f"{base}.weights_scaling_factor"]                         # [N, K/G]
    pre = w[f"{base}.prequant_scaling_factor"].to(dtype)
    if device.type == "cuda":       # the Triton kernel reads the checkpoint's packed bytes as they are
        return Int4AWQLinear(pre, group, w[f"{base}.weight"].contiguous(), scales.to(dtype).contiguous(), bias)
    q = unpack_int4(w[f"{base}.weight"])                                 # [N, K]
    packed = torch._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    # _weight_int4pack_mm dequantizes (u4 - 8) * scale + zero; with u4 = q + 8 and zero 0 that is q * scale.
    sz = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).to(dtype).contiguous()
    return Int4AWQLinear(pre, group, packed, sz, bias)


def _fp8_linear(w: dict[str, torch.Tensor], base: str, dtype: torch.dtype, device: torch.device,
                bias: torch.Tensor | None) -> FP8Linear:
    weight, w_scale = w[f"{base}.weight"], w[f"{base}.weights_scaling_factor"].float()
    act = w[f"{base}.activation_scaling_factor"].float()
    if device.type == "cuda":
        return FP8Linear(weight.t(), w_scale, act, bias)
    # No fast fp8 GEMM on CPU (torch._scaled_mm runs there far too slowly): dequantize once at load.
    round_input = None
    if dtype == torch.float32 and cpu_available():
        from plugins.cpu.fp8_round import round_through_e4m3

        round_input = round_through_e4m3
    return FP8Linear((weight.float() * w_scale).to(dtype), w_scale, act, bias, round_input)
