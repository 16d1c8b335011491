"""The Qwen2-VL / Qwen2.5-VL vision tower as plain functions over its weight dict.

What it is for: one forward pass from flattened patches (`pixel_values`
[N, C*T*P*P], HF patch order) to merged image embeddings [N / merge^2,
out_hidden_size], reading exactly the tensors of `vision/encoder.safetensors`.
All data-dependent inputs (2-D positions, segment and window boundaries) come
from runtime/families/qwen2_vl/tower_inputs.py, so the same function is the PyTorch backend and,
with `segmented=False`, the graph exported to ONNX: attention then uses one
block-diagonal mask built in the graph and a single SDPA call.
Qwen2-VL: LayerNorm, QuickGELU MLP. Qwen2.5-VL: RMSNorm, gated SiLU MLP,
window attention in all blocks but `fullatt_block_indexes`, tokens permuted
into window order before the blocks and back after the merger.
Not for: preprocessing, batching across requests or caching (runtime/vision/vision_encoder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine_format.families.qwen2_vl import NORM_EPS, QwenVisionConfig


def vision_forward(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], pixel_values: torch.Tensor,
                   position_ids: torch.Tensor, cu_seqlens: torch.Tensor,
                   window_index: torch.Tensor | None = None, cu_window_seqlens: torch.Tensor | None = None,
                   segmented: bool = True) -> torch.Tensor:
    """Image embeddings [N / merge^2, out_hidden_size] in input order, in the weights' dtype.

    segmented=True runs one attention call per segment (eager, memory ~ largest
    segment squared); False builds the block-diagonal mask in the graph (export).
    """
    dtype = w["patch_embed.proj.weight"].dtype
    x = F.linear(pixel_values.to(dtype), w["patch_embed.proj.weight"].reshape(cfg.embed_dim, -1))
    cos, sin = rotary_cos_sin(cfg, position_ids)
    if cfg.uses_windows:
        if window_index is None or cu_window_seqlens is None:
            raise ValueError("Qwen2.5-VL needs window_index and cu_window_seqlens (runtime/families/qwen2_vl/tower_inputs.py)")
        x, cos, sin = (_to_window_order(t, window_index, cfg.merge_unit) for t in (x, cos, sin))
    for i in range(cfg.depth):
        full = not cfg.uses_windows or i in cfg.fullatt_block_indexes
        bounds = cu_seqlens if full else cu_window_seqlens
        x = _block(cfg, w, f"blocks.{i}.", x, cos, sin, bounds, segmented)
    merged = _merger(cfg, w, x)
    if cfg.uses_windows:
        merged = merged[torch.argsort(window_index)]
    return merged


def rotary_cos_sin(cfg: QwenVisionConfig, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D rotary: head_dim / 4 frequencies per axis; angles (rows | columns) repeated over both halves."""
    quarter = cfg.head_dim // 2
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float32) / quarter))
    angles = position_ids.to(torch.float32)[:, :, None] * inv_freq.to(position_ids.device)   # [N, 2, D/4]
    angles = angles.flatten(1)                                                                 # [N, D/2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _to_window_order(t: torch.Tensor, window_index: torch.Tensor, unit: int) -> torch.Tensor:
    """Permute merge-units (groups of `unit` consecutive patches) into window order."""
    return t.reshape(-1, unit, t.shape[-1])[window_index].reshape(-1, t.shape[-1])


def _block(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor, bounds: torch.Tensor, segmented: bool) -> torch.Tensor:
    x = x + _attention(cfg, w, p + "attn.", _norm(cfg, w, p + "norm1", x), cos, sin, bounds, segmented)
    return x + _mlp(cfg, w, p + "mlp.", _norm(cfg, w, p + "norm2", x))


def _norm(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    if not cfg.uses_windows:
        return F.layer_norm(x, (cfg.embed_dim,), w[name + ".weight"], w[name + ".bias"], NORM_EPS)
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return w[name + ".weight"] * x32.to(x.dtype)


def _mlp(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor) -> torch.Tensor:
    if cfg.uses_windows:
        gate = F.linear(x, w[p + "gate_proj.weight"], w[p + "gate_proj.bias"])
        up = F.linear(x, w[p + "up_proj.weight"], w[p + "up_proj.bias"])
        return F.linear(F.silu(gate) * up, w[p + "down_proj.weight"], w[p + "down_proj.bias"])
    h = F.linear(x, w[p + "fc1.weight"], w[p + "fc1.bias"])
    h = h * torch.sigmoid(1.702 * h)                                      # QuickGELU
    return F.linear(h, w[p + "fc2.weight"], w[p + "fc2.bias"])


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary in float32 (as HF), x: [N, H, D], cos / sin: [N, D]."""
    x32 = x.to(torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def _attention(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], p: str, x: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, bounds: torch.Tensor, segmented: bool) -> torch.Tensor:
    n = x.shape[0]
    qkv = F.linear(x, w[p + "qkv.weight"], w[p + "qkv.bias"]).reshape(n, 3, cfg.num_heads, cfg.head_dim)
    q, k, v = qkv.unbind(1)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))                     # [H, N, D]
    if segmented:
        out = segment_attention(q, k, v, bounds.tolist())
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(bounds, n))
    return F.linear(out.transpose(0, 1).reshape(n, -1), w[p + "proj.weight"], w[p + "proj.bias"])


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Attention within each segment [edges[i], edges[i+1]) of q / k / v [H, N, D] -> [H, N, D]. Consecutive
    segments of one length (the frames of a video, same-size images of several requests) run as one batched
    SDPA call [segments, H, length, D]: one call for a whole batch of 224x224 images instead of one each."""
    heads, _, dim = q.shape
    lengths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    outputs, first = [], 0
    while first < len(lengths):
        last = first
        while last < len(lengths) and lengths[last] == lengths[first]:
            last += 1
        start, end, length = edges[first], edges[last], lengths[first]
        if length > 0:
            runs = [t[:, start:end].reshape(heads, last - first, length, dim).transpose(0, 1) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*runs)
            outputs.append(out.transpose(0, 1).reshape(heads, end - start, dim))
        first = last
    return torch.cat(outputs, dim=1)


def block_diagonal_mask(bounds: torch.Tensor, n: int) -> torch.Tensor:
    """[N, N] bool: True where query and key lie in the same segment; built from tensors only (exportable)."""
    positions = torch.arange(n, device=bounds.device, dtype=bounds.dtype)
    segment = (positions[:, None] >= bounds[None, 1:]).to(torch.int64).sum(-1)      # segment id per position
    return segment[:, None] == segment[None, :]


def _merger(cfg: QwenVisionConfig, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    x = _norm(cfg, w, "merger.ln_q", x).reshape(-1, cfg.embed_dim * cfg.merge_unit)
    x = F.gelu(F.linear(x, w["merger.mlp.0.weight"], w["merger.mlp.0.bias"]))
    return F.linear(x, w["merger.mlp.2.weight"], w["merger.mlp.2.bias"])
