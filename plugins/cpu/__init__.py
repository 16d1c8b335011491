"""CPU fast paths of the custom ops (numba kernels that read the paged KV cache in place)."""
