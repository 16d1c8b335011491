"""Pick the implementation of each custom op for a device.

What it is for: the one place where the executor gets its ops. "auto" gives the
Triton kernels (plugins/triton) on CUDA, the CPU fast path (plugins/cpu: numba
kernels for paged attention, the KV write, RMSNorm, RoPE) on CPU, and
the reference implementations (plugins/reference) elsewhere; "reference",
"cpu" and "triton" force one set ("triton" on a CPU tensor needs
TRITON_INTERPRET=1, which only tests set).
Not for: the op implementations themselves.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Callable

import torch

from plugins.reference import activation, kv_dequant, paged_attention, rmsnorm, rope
from plugins.reference.qkv_attention import REFERENCE_QKV_ATTENTION, UnfusedQKVAttention, reference_attention_meta

OP_BACKENDS = ("auto", "reference", "cpu", "triton")


@dataclass(frozen=True, slots=True)
class OpSet:
    name: str
    rms_norm: Callable[..., torch.Tensor]                          # (x, weight, eps)
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (x, residual, weight, eps) -> (normed, residual)
    silu_and_mul: Callable[..., torch.Tensor]                      # (gate, up)
    rope_cos_sin: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]   # may rotate q / k in place: use the result
    write_kv_cache: Callable[..., None]                            # slot -1: skip the row (Triton)
    # (q, key_cache, value_cache, block_tables, seq_lens, query_lens, scale): host lists, the reference signature
    paged_attention: Callable[..., torch.Tensor]
    paged_attention_meta: Callable[..., torch.Tensor]              # (q, kc, vc, AttentionMetadata, scale)
    # (qkv [T, (H + 2 Hkv) D], cos, sin, kc, vc, slot_mapping, AttentionMetadata, scale) -> [T, H D]: RoPE, the
    # KV write and attention over one qkv projection's rows (plugins/reference/qkv_attention.py); float caches
    qkv_attention: Callable[..., torch.Tensor]
    # decode steps through these ops read only device tensors and static shapes: a CUDA graph may capture them
    graph_safe: bool = False
    # one-byte KV cache: (key_codes, value_codes, AttentionMetadata, byte table) -> (keys, values, block tables)
    dequantize_kv_context: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = \
        kv_dequant.dequantize_kv_context


REFERENCE_OPS = OpSet(
    name="reference",
    rms_norm=rmsnorm.rms_norm,
    add_rms_norm=rmsnorm.add_rms_norm,
    silu_and_mul=activation.silu_and_mul,
    rope_cos_sin=rope.rope_cos_sin,
    apply_rope=rope.apply_rope,
    write_kv_cache=paged_attention.write_kv_cache,
    paged_attention=paged_attention.paged_attention,
    paged_attention_meta=reference_attention_meta,
    qkv_attention=REFERENCE_QKV_ATTENTION,
)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_ops() -> OpSet:
    """The Triton kernels (imported here, lazily: importing Triton costs time and CPU-only hosts skip it).

    RoPE angles stay the reference's (once per step, float32; see plugins/triton/rope.py).
    Quantization's kernels (int8 / FP8 KV dequantization, weight-only GEMMs) join here
    as fields of their own; their seam is documented in plugins/triton/kv_cache.py.
    """
    from plugins.triton import attention, kv_cache, norm_act
    from plugins.triton import rope as triton_rope

    return OpSet(
        name="triton",
        rms_norm=norm_act.rms_norm,
        add_rms_norm=norm_act.add_rms_norm,
        silu_and_mul=norm_act.silu_and_mul,
        rope_cos_sin=rope.rope_cos_sin,
        apply_rope=triton_rope.apply_rope,
        write_kv_cache=kv_cache.write_kv_cache,
        paged_attention=attention.paged_attention,
        paged_attention_meta=attention.paged_attention_meta,
        qkv_attention=UnfusedQKVAttention(triton_rope.apply_rope, kv_cache.write_kv_cache,
                                          attention.paged_attention_meta),
        graph_safe=True,
    )


def cpu_available() -> bool:
    return importlib.util.find_spec("numba") is not None


def cpu_ops() -> OpSet:
    """The CPU kernels (numba: paged attention and the KV write, RMSNorm and its residual add, RoPE, and the
    attention block fused, qkv_attention: RoPE, KV write and attention in one call on the qkv rows;
    imported here, lazily: numba's import and first compile cost time that a CUDA host never needs)
    and the reference ops otherwise (rope_cos_sin; silu_and_mul, whose two vectorised ATen ops beat a
    numba loop with a scalar exp: 4 us against 13 us at [16, 160], 63 us against 1.3 ms at [16, 4864]).
    Dtypes a kernel cannot read (bfloat16, float16) go to the reference op inside it."""
    from plugins.cpu import kv_dequant as cpu_kv_dequant
    from plugins.cpu import paged_attention as cpu_attention
    from plugins.cpu import rmsnorm as cpu_rmsnorm
    from plugins.cpu import rope as cpu_rope

    return replace(REFERENCE_OPS, name="cpu", rms_norm=cpu_rmsnorm.rms_norm, add_rms_norm=cpu_rmsnorm.add_rms_norm,
                   apply_rope=cpu_rope.apply_rope,
                   write_kv_cache=cpu_attention.write_kv_cache,
                   paged_attention=cpu_attention.paged_attention,
                   paged_attention_meta=cpu_attention.paged_attention_meta,
                   qkv_attention=cpu_attention.qkv_attention,
                   dequantize_kv_context=cpu_kv_dequant.dequantize_kv_context)


def get_ops(device: torch.device, backend: str = "auto") -> OpSet:
    """Return the op set for `device`. `backend`: one of OP_BACKENDS."""
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend: unknown op backend {backend!r} {OP_BACKENDS}")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend: 'triton' needs the triton package (pip install 'trtserve[kernels]')")
        return triton_ops()
    if backend == "cpu":
        if not cpu_available():
            raise ValueError("backend: 'cpu' needs the numba package")
        return cpu_ops()
    if backend == "auto" and device.type == "cuda" and triton_available():
        return triton_ops()
    if backend == "auto" and device.type == "cpu" and cpu_available():
        return cpu_ops()
    return REFERENCE_OPS
