"""Float TensorRT-LLM checkpoint tensors + calibration -> the quantized tensors of each algorithm.

What it is for: the arithmetic of quantization (symmetric, no zero points) and
the exact tensors engine_format/checkpoint_layout.py names: per-channel int8
(W8A16, W8A8 SmoothQuant), int4 groups of 128 packed two per byte (AWQ),
per-tensor float8_e4m3fn (FP8), and the per-layer KV-cache scales. Layers fused
in TensorRT-LLM (qkv) get one pre-quant scale: the mean of Model Optimizer's
per-module scales, as its own export re-smooths fused layers; the activation
scale of x * smoother is then exact from the recorded per-channel input absmax.
Scales are rounded to the dtype they are stored in before the weights are
divided by them, so the runtime dequantizes with exactly the scale used here.
Not for: calibration (builder/quantize.py) or the runtime kernels.
"""
from __future__ import annotations

import torch

from builder.calib_data import QuantizeError
from builder.quantize import Calibration
from engine_format.checkpoint_layout import layer_prefix, linear_shapes
from engine_format.llm_config import LLMConfig

INT8_MAX, INT4_MIN, INT4_MAX, FP8_MAX = 127.0, -8.0, 7.0, 448.0
TINY = 1e-8


def quantize_checkpoint(tensors: dict[str, torch.Tensor], cfg: LLMConfig, calib: Calibration) -> dict[str, torch.Tensor]:
    """`tensors`: the float checkpoint of `cfg` without quantization; `cfg`: the quantized config."""
    dtype: torch.dtype = getattr(torch, cfg.dtype)
    out = dict(tensors)
    algo = cfg.quant_algo
    if algo is not None:
        for base in linear_shapes(cfg):
            weight = out.pop(f"{base}.weight").float()
            for suffix, t in quantize_linear(algo, weight, calib, base, cfg.quant.group_size, dtype).items():
                out[f"{base}.{suffix}"] = t.contiguous()
    if cfg.kv_cache_quant_algo is not None:
        qmax = INT8_MAX if cfg.kv_cache_quant_algo == "INT8" else FP8_MAX
        for i in range(cfg.num_hidden_layers):
            if i not in calib.kv_amax:
                raise QuantizeError(f"--kv-cache-dtype: no KV amax was calibrated for layer {i}")
            scale = torch.tensor([max(calib.kv_amax[i], TINY) / qmax], dtype=torch.float32)
            out[f"{layer_prefix(i)}.attention.kv_cache_scaling_factor"] = scale
            out[f"{layer_prefix(i)}.attention.kv_cache_rcp_scaling_factor"] = 1.0 / scale
    return out


def quantize_linear(algo: str, weight: torch.Tensor, calib: Calibration, base: str, group_size: int,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    if algo == "W8A16":
        q, scale = int8_per_channel(weight, dtype)
        return {"weight": q.t(), "per_channel_scale": scale}          # [K, N] as WeightOnlyQuantLinear reads it
    if algo == "FP8":
        w_scale = (weight.abs().max().clamp(min=TINY) / FP8_MAX).reshape(1)
        a_scale = (calib.input_absmax[base].max().clamp(min=TINY) / FP8_MAX).reshape(1)
        q = (weight / w_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return {"weight": q, "weights_scaling_factor": w_scale, "activation_scaling_factor": a_scale}
    smoother = fused_prequant(calib, base, dtype)
    smoothed = weight / smoother.float()[None, :]                  # (x * p) @ (W / p)^T == x @ W^T
    if algo == "W8A8_SQ_PER_CHANNEL":
        q, scale = int8_per_channel(smoothed, torch.float32)
        act_amax = (calib.input_absmax[base] * smoother.float()).max().clamp(min=TINY)
        return {"weight": q, "weights_scaling_factor": scale,
                "activation_scaling_factor": (act_amax / INT8_MAX).reshape(1), "prequant_scaling_factor": smoother}
    if algo == "W4A16_AWQ":
        q, scales = int4_groups(smoothed, group_size, dtype)
        return {"weight": pack_int4(q), "weights_scaling_factor": scales, "prequant_scaling_factor": smoother}
    raise QuantizeError(f"--quant: no packing for quant_algo {algo!r}")


def int8_per_channel(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: q int8 [N, K], scale [N] in scale_dtype (q * scale ~= weight)."""
    scale = (weight.abs().amax(dim=1).clamp(min=TINY) / INT8_MAX).to(scale_dtype)
    q = torch.round(weight / scale.float()[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def int4_groups(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per (row, group of `group_size` inputs): q int8 [N, K] in [-8, 7], scales [N, K/G]."""
    n, k = weight.shape
    groups = weight.reshape(n, k // group_size, group_size)
    scales = (groups.abs().amax(dim=2).clamp(min=TINY) / INT4_MAX).to(scale_dtype)
    q = torch.round(groups / scales.float()[:, :, None]).clamp(INT4_MIN, INT4_MAX).to(torch.int8)
    return q.reshape(n, k), scales


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] in [-8, 7] -> int8 [N/2, K]: row 2i in the low nibble, row 2i+1 in the high nibble
    (TensorRT-LLM transposes this to [K, N/2] and packs it as quint4x2, first element low)."""
    low, high = q[0::2].to(torch.int16), q[1::2].to(torch.int16)
    packed = (low & 0x0F) | ((high & 0x0F) << 4)
    return packed.to(torch.uint8).view(torch.int8)


def fused_prequant(calib: Calibration, base: str, dtype: torch.dtype) -> torch.Tensor:
    """One smoother for a (possibly fused) layer: the mean of its modules' scales, stored in `dtype`."""
    if base not in calib.prequant:
        raise QuantizeError(f"--quant: no pre-quant scale was calibrated for {base}")
    scales = torch.stack(calib.prequant[base]).mean(dim=0)
    return scales.clamp(min=TINY).to(dtype)
