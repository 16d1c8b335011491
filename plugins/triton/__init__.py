"""Triton kernels for the custom ops: chosen on CUDA by plugins/registry.py, tested on CPU in the interpreter.

Each module holds the kernels of one op family and the Python launcher with the
reference op's signature. Arithmetic follows the reference op (float32
accumulation, the same rounding points), so results match it to a stated tolerance.
"""
