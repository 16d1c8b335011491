"""Every Triton kernel compiles for a Hopper GPU (sm_90), ahead of time and without one, in the
configurations the launchers choose on CUDA. The interpreter tests (test_triton_*.py) check the
arithmetic but not what only the compiler rejects (types, dot shapes, control flow); this catches
those on CPU-only CI. The compiler runs in a child process without TRITON_INTERPRET: Triton reads it
when its own library is imported, so an interpreting process cannot also compile.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _configs() -> list[tuple[str, object, dict[str, str], dict[str, object], int]]:
    """(label, kernel, pointer element types, constexprs, num_warps) as the CUDA launchers set them."""
    import triton

    from plugins.triton import attention_decode, attention_prefill, kv_cache, norm_act, rope

    configs: list[tuple[str, object, dict[str, str], dict[str, object], int]] = []
    for dtype, head_size, group, split in (("bf16", 64, 7, True), ("fp16", 128, 6, False), ("fp32", 16, 2, True)):
        head_pad = max(16, triton.next_power_of_2(head_size))
        precision = "ieee" if dtype == "fp32" else "tf32"
        configs.append((f"decode {dtype} d{head_size} g{group} split={split}", attention_decode._decode_kernel,
                        {"q_ptr": dtype, "key_cache_ptr": dtype, "value_cache_ptr": dtype, "out_ptr": dtype,
                         "block_tables_ptr": "i64", "seq_lens_ptr": "i32", "part_out_ptr": "fp32",
                         "part_lse_ptr": "fp32"},
                        {"GROUP": group, "GROUP_PAD": max(16, triton.next_power_of_2(group)), "HEAD_SIZE": head_size,
                         "HEAD_PAD": head_pad, "BLOCK_SIZE": 32, "SPLIT": split, "DOT_PRECISION": precision,
                         "BLOCK_N": attention_decode.decode_block_n(head_size, True)}, 4))
        configs.append((f"merge splits {dtype} d{head_size}", attention_decode._merge_splits_kernel,
                        {"part_out_ptr": "fp32", "part_lse_ptr": "fp32", "out_ptr": dtype},
                        {"HEAD_SIZE": head_size, "HEAD_PAD": head_pad, "SPLITS_PAD": 64}, 4))
        max_query_len = {"bf16": 512, "fp16": 8, "fp32": 40}[dtype]
        block_m, block_n, num_warps = attention_prefill.prefill_blocks(max_query_len, head_size, True)
        configs.append((f"prefill {dtype} d{head_size} m{block_m}", attention_prefill._prefill_kernel,
                        {"q_ptr": dtype, "key_cache_ptr": dtype, "value_cache_ptr": dtype, "out_ptr": dtype,
                         "block_tables_ptr": "i64", "seq_lens_ptr": "i32", "query_start_ptr": "i32"},
                        {"GROUP": group, "HEAD_SIZE": head_size, "HEAD_PAD": head_pad, "BLOCK_SIZE": 32,
                         "BLOCK_M": block_m, "BLOCK_N": block_n, "DOT_PRECISION": precision}, num_warps))
    for dtype in ("bf16", "fp32"):
        for residual in (True, False):
            configs.append((f"rms_norm {dtype} residual={residual}", norm_act._rms_norm_kernel,
                            {"x_ptr": dtype, "res_ptr": dtype, "w_ptr": dtype, "out_ptr": dtype},
                            {"HAS_RESIDUAL": residual, "BLOCK": 1024}, 4))
        configs.append((f"silu_and_mul {dtype}", norm_act._silu_and_mul_kernel,
                        {"gate_ptr": dtype, "up_ptr": dtype, "out_ptr": dtype}, {"BLOCK": 1024}, 4))
        configs.append((f"rope {dtype}", rope._rope_kernel,
                        {"q_ptr": dtype, "k_ptr": dtype, "cos_ptr": dtype, "sin_ptr": dtype},
                        {"HALF": 64, "HALF_PAD": 64, "HEADS_PAD": 16}, 4))
        configs.append((f"write_kv {dtype}", kv_cache._write_kv_kernel,
                        {"k_ptr": dtype, "v_ptr": dtype, "key_cache_ptr": dtype, "value_cache_ptr": dtype,
                         "slot_ptr": "i64"}, {"HEAD_SIZE": 128, "HEAD_PAD": 128, "HEADS_PAD": 2}, 4))
    return configs


def compile_all() -> None:
    """In the child process: compile every configuration; print one line each; exit 1 on any failure."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for label, kernel, pointers, constexprs, num_warps in _configs():
        signature = {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
                     else "fp32" if name in ("scale", "eps") else "i32" for name in kernel.arg_names}
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": num_warps})
            ok = bool(compiled.asm["cubin"])
            print(f"{'ok' if ok else 'EMPTY'} {label}", flush=True)
        except Exception as exc:        # report every kernel, not just the first
            ok = False
            print(f"FAILED {label}: {type(exc).__name__}: {str(exc)[-600:]}", flush=True)
        failures += not ok
    sys.exit(1 if failures else 0)


def test_every_kernel_compiles_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", "from tests.plugins.test_triton_compile import compile_all; "
                             "compile_all()"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    assert result.stdout.count("ok ") == len(result.stdout.strip().splitlines()) >= 17
