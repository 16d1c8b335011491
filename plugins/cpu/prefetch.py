"""A software prefetch for numba kernels: `prefetch_l2(array, index)` asks the CPU to bring the cache line of
`array.ravel()[index]` into L2 ahead of its use (LLVM's `llvm.prefetch`: read, locality 2, data).

What it is for: kernels that stream a large operand (a decode step's float32 weights) in short runs that the
hardware prefetcher does not run ahead of: plugins/cpu/skinny_gemm.py reads each weight row (2-6 KiB) in
bursts, and asking for the next block's lines while computing this one took 8 layers of small-qwen2's linears
at 16 rows from 6.4 to 4.8-5.3 ms (2 threads, cold weights). A prefetch never faults and never changes a
result; `index` must lie inside the array all the same (callers bound it).
Not for: Python callers (it is a numba intrinsic, usable only inside njit functions), CUDA.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_READ, _LOCALITY_L2, _DATA_CACHE = 0, 2, 1


@intrinsic
def prefetch_l2(typingctx, array, index):  # type: ignore[no-untyped-def]  (numba's intrinsic protocol)
    """Prefetch the line holding element `index` of a contiguous array's data (flat element index)."""
    if not isinstance(array, types.Array) or not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        address = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), i32, i32, i32])
        function = cgutils.get_or_insert_function(builder.module, function_type, "llvm.prefetch.p0")
        builder.call(function, [address, ir.Constant(i32, _READ), ir.Constant(i32, _LOCALITY_L2),
                                ir.Constant(i32, _DATA_CACHE)])
        return context.get_dummy_value()

    return types.void(array, index), codegen
