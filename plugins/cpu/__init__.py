"""CPU fast paths of the custom ops (numba kernels that read the paged KV cache in place).

`use_step_threads`: the thread count a parallel kernel splits its call over, the step's torch threads
(runtime/core/thread_policy.py sets them per step), applied to numba's pool (the same OpenMP runtime).
"""
from __future__ import annotations

import numba
import torch


def use_step_threads() -> int:
    """Set numba's threads to the step's torch thread count (at most numba's pool) and return it."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    return threads
