"""The quantized linear kernels against a float64 reference computed from the same quantized weights
(exact up to accumulation order), the CUDA Triton kernels in Triton's CPU interpreter, and the error for a
device without the kernel."""
from __future__ import annotations

import pytest
import torch

from builder.quantize_pack import int4_groups, int8_per_channel, pack_int4
from engine_format.quant_config import QuantSpec
from runtime.executor.quant_linear import QuantKernelError, build_linears, check_kernel, unpack_int4
from tests.helpers.quant import tiny_cfg

N, K, G = 48, 256, 128


@pytest.fixture(scope="module")
def weights() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=gen)
    x = torch.randn(5, K, generator=gen)
    bias = torch.randn(N, generator=gen)
    return w, x, bias


def linear_of(algo: str, tensors: dict[str, torch.Tensor], dtype: str = "float32"):
    cfg = tiny_cfg(dtype, QuantSpec.for_modes(algo, None))
    return build_linears(cfg, tensors, ["l"], torch.device("cpu"))["l"]


def close(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    err = float((got.double() - ref).abs().max())
    assert err <= rel * float(ref.abs().max()), f"max error {err:.3e} vs max |ref| {float(ref.abs().max()):.3e}"


def test_int8_weight_only_matches_dequantized_reference(weights) -> None:
    w, x, bias = weights
    q, s = int8_per_channel(w, torch.float32)
    lin = linear_of("int8_wo", {"l.weight": q.t().contiguous(), "l.per_channel_scale": s, "l.bias": bias})
    ref = x.double() @ (q.double() * s.double()[:, None]).T + bias.double()
    close(lin(x), ref, 1e-5)
    assert lin.qweight.dtype == torch.int8         # the GEMM reads int8 weights, not a float copy


def test_int8_weight_only_bf16_activations(weights) -> None:
    w, x, _ = weights
    q, s = int8_per_channel(w, torch.bfloat16)
    lin = linear_of("int8_wo", {"l.weight": q.t().contiguous(), "l.per_channel_scale": s}, "bfloat16")
    xb = x.bfloat16()
    ref = xb.double() @ (q.double() * s.double()[:, None]).T
    close(lin(xb), ref, 2 ** -7)                   # bf16 output rounding


def test_int4_awq_matches_dequantized_reference(weights) -> None:
    w, x, bias = weights
    pre = torch.linspace(0.5, 2.0, K)
    q, s = int4_groups(w / pre, G, torch.float32)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    lin = linear_of("int4_awq", {"l.weight": pack_int4(q), "l.weights_scaling_factor": s,
                                 "l.prequant_scaling_factor": pre, "l.bias": bias})
    deq = q.double() * s.double().repeat_interleave(G, dim=1)
    ref = (x.double() * pre.double()) @ deq.T + bias.double()
    close(lin(x), ref, 1e-4)


def test_smoothquant_int8_activations_match_reference(weights) -> None:
    w, x, _ = weights
    pre = torch.linspace(0.5, 2.0, K)
    q, ws = int8_per_channel(w / pre, torch.float32)
    act = float((x * pre).abs().max()) / 127
    lin = linear_of("w8a8_sq", {"l.weight": q, "l.weights_scaling_factor": ws,
                                "l.activation_scaling_factor": torch.tensor([act]), "l.prequant_scaling_factor": pre})
    xq = torch.round((x * pre).double() / act).clamp(-128, 127)
    ref = (xq @ q.double().T) * act * ws.double()
    close(lin(x), ref, 1e-5)
    assert torch.equal(torch._int_mm(xq.to(torch.int8), q.t()), (xq @ q.double().T).to(torch.int32))


def test_fp8_matches_reference(weights) -> None:
    w, x, _ = weights
    ws, act = w.abs().max() / 448, x.abs().max() / 448
    wq = (w / ws).to(torch.float8_e4m3fn)
    lin = linear_of("fp8", {"l.weight": wq, "l.weights_scaling_factor": ws.reshape(1),
                            "l.activation_scaling_factor": act.reshape(1)})
    xq = (x / act).to(torch.float8_e4m3fn).double() * float(act)
    ref = xq @ (wq.double() * float(ws)).T
    close(lin(x), ref, 1e-5)


def test_missing_kernel_names_mode_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(QuantKernelError, match=r"quant_algo W8A16: no kernel on device meta"):
        check_kernel("W8A16", torch.device("meta"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(QuantKernelError, match=r"quant_algo FP8: no kernel on device cuda.*sm_80"):
        check_kernel("FP8", torch.device("cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_weight_only_kernels_in_interpreter(weights, dtype: torch.dtype) -> None:
    """The CUDA kernels, run by Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET)."""
    pytest.importorskip("triton")
    from plugins.quant_gemm_triton import w4a16_matmul, w8a16_matmul

    w, x, _ = weights
    x = x.to(dtype)
    rel = 1e-5 if dtype == torch.float32 else 2 ** -7
    q, s = int8_per_channel(w, dtype)
    close(w8a16_matmul(x, q, s), x.double() @ (q.double() * s.double()[:, None]).T, rel)
    q4, s4 = int4_groups(w, G, dtype)
    ref = x.double() @ (q4.double() * s4.double().repeat_interleave(G, dim=1)).T
    close(w4a16_matmul(x, pack_int4(q4), s4, G), ref, rel)


def test_float_linear_layouts_match_float64_and_follow_the_bytes_rule() -> None:
    """A CPU FloatLinear copies its weight to a contiguous [K, N] layout up to COPY_MAX_BYTES (up to
    OWNED_MAX_BYTES when it owns a bf16 weight) and keeps the transposed view above; a float32 weight above
    SKINNY_MIN_BYTES with rows of SKINNY_MIN_K or more, owned or not, stays [N, K] and sends calls of SKINNY_ROWS
    rows to the register-tiled kernel (plugins/cpu/skinny_gemm.py); one with shorter rows is copied up to
    COPY_MAX_BYTES. Every layout and path, 2-D inputs of 1-30 rows and 3-D ones, with and without bias, equals
    float64 x W^T + b (float32 within 1e-5 relative, bf16 within 2^-7)."""
    from plugins.cpu.skinny_gemm import SKINNY_ROWS
    from runtime.executor.quant_linear import (COPY_MAX_BYTES, OWNED_MAX_BYTES, SKINNY_MIN_BYTES, SKINNY_MIN_K,
                                               FloatLinear, concat_float_linears)

    gen = torch.Generator().manual_seed(4)
    small, large = (64, 200), (COPY_MAX_BYTES // 4 // 256 + 1, 256)      # at most / just past COPY_MAX_BYTES
    mid = (SKINNY_MIN_BYTES // 4 // SKINNY_MIN_K + 1, SKINNY_MIN_K)     # just past SKINNY_MIN_BYTES
    short_rows = (SKINNY_MIN_BYTES // 4 // 64 + 1, 64)                 # as large, rows shorter than SKINNY_MIN_K
    bf16_large = (COPY_MAX_BYTES // 2 // 256 + 1, 256)
    assert SKINNY_MIN_BYTES < mid[0] * mid[1] * 4 <= COPY_MAX_BYTES and short_rows[0] * 64 * 4 <= COPY_MAX_BYTES
    cases = [(small, torch.float32, False, True), (large, torch.float32, False, False),
             (large, torch.float32, True, False), (mid, torch.float32, False, False),
             (short_rows, torch.float32, False, True), (bf16_large, torch.bfloat16, False, False),
             (bf16_large, torch.bfloat16, True, True)]
    for (n, k), dtype, owned, copied in cases:
        rel = 1e-5 if dtype == torch.float32 else 2 ** -7
        weight, bias = torch.randn(n, k, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
        skinny = dtype == torch.float32 and not copied
        for b in (None, bias):
            linear = FloatLinear(weight, b, owned=owned)
            assert linear.weight_t.is_contiguous() == copied and torch.equal(linear.weight, weight)
            assert (linear.weight_t.data_ptr() == weight.data_ptr()) != copied
            assert linear.skinny_rows == (SKINNY_ROWS if skinny else (1, 0))
            for x in [torch.randn(rows, k, generator=gen) for rows in (1, 3, 4, 7, 16, 24, 30)] + \
                    [torch.randn(2, 3, k, generator=gen)]:
                x = x.to(dtype)
                want = x.double() @ weight.double().t() + (0 if b is None else b.double())
                close(linear(x), want, rel)
    assert OWNED_MAX_BYTES >= COPY_MAX_BYTES
    pair = [FloatLinear(torch.randn(48, 32, generator=gen), None) for _ in range(2)]
    fused = concat_float_linears(pair)
    assert fused.owned and fused.weight_t.is_contiguous()
    x = torch.randn(3, 32, generator=gen)
    close(fused(x), torch.cat([linear(x) for linear in pair], dim=1).double(), 1e-6)
