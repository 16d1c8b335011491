"""How many KV blocks the pool gets: from a profiled peak on CUDA, a fixed budget on CPU, a hard cap on both.

What it is for: the start-up arithmetic behind `EngineLayout.num_kv_blocks`, kept
apart from the executor so it is tested with plain numbers on any machine. On CUDA
the budget is `total * gpu_memory_fraction`, less the profiled peak of a warm-up
forward at max_num_tokens (weights + activations, from PyTorch's allocator), less
memory used outside PyTorch's allocator (CUDA context, other processes), less a
reserve for captured CUDA graphs. `kv_cache_max_bytes` caps the pool on every device.
Not for: running the warm-up forward (runtime/executor/executor.py) or owning blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtime.config import EngineConfig, EngineConfigError, EngineLayout

GIB = 2**30
CUDA_GRAPH_RESERVE_BYTES = 256 * 2**20     # private pool of the captured decode graphs (small activations)


@dataclass(frozen=True, slots=True)
class GpuMemory:
    """What the allocator and the driver said after the warm-up forward."""

    total_bytes: int
    free_bytes: int
    reserved_bytes: int      # torch.cuda.memory_reserved: held by PyTorch's caching allocator
    peak_bytes: int          # torch.cuda.max_memory_allocated during the warm-up forward


@dataclass(frozen=True, slots=True)
class KVPoolSize:
    num_blocks: int
    budget_bytes: int
    description: str         # one line for the start-up report


def size_kv_pool(config: EngineConfig, wanted_blocks: int, bytes_per_block: int,
                 gpu: GpuMemory | None) -> KVPoolSize:
    """Blocks for the pool: the explicit num_kv_blocks, else what the budget holds, at most `wanted_blocks`.

    `gpu`: None on CPU (budget kv_cache_memory_gib). Raises EngineConfigError naming the field
    whose limit leaves no room for one block, or that an explicit block count exceeds.
    """
    cap = config.kv_cache_max_bytes
    if config.num_kv_blocks is not None:
        if cap is not None and config.num_kv_blocks * bytes_per_block > cap:
            raise EngineConfigError("num_kv_blocks", f"{config.num_kv_blocks} blocks of {bytes_per_block} bytes "
                                                     f"exceed kv_cache_max_bytes={cap}")
        return KVPoolSize(config.num_kv_blocks, config.num_kv_blocks * bytes_per_block, "num_kv_blocks (explicit)")
    if gpu is None:
        budget = int(config.kv_cache_memory_gib * GIB)
        how = f"kv_cache_memory_gib={config.kv_cache_memory_gib:g}"
    else:
        budget = gpu_kv_budget(gpu, config.gpu_memory_fraction, config.enable_cuda_graphs)
        how = (f"{config.gpu_memory_fraction:g} x {gpu.total_bytes / GIB:.1f} GiB total - profiled peak "
               f"{gpu.peak_bytes / GIB:.2f} GiB - {(gpu.total_bytes - gpu.free_bytes - gpu.reserved_bytes) / GIB:.2f}"
               f" GiB outside PyTorch")
        if budget < bytes_per_block:
            raise EngineConfigError("gpu_memory_fraction", f"{how} leaves {max(budget, 0)} bytes, less than one "
                                                           f"KV block ({bytes_per_block} bytes)")
    if cap is not None and cap < budget:
        budget, how = cap, f"kv_cache_max_bytes={cap}"
        if cap < bytes_per_block:
            raise EngineConfigError("kv_cache_max_bytes", f"{cap} bytes hold no KV block "
                                                          f"(one block is {bytes_per_block} bytes)")
    num_blocks = max(1, min(wanted_blocks, budget // bytes_per_block))
    limit = " (enough for max_batch_size full sequences)" if num_blocks == wanted_blocks else ""
    return KVPoolSize(num_blocks, budget, f"{how}{limit}")


def gpu_kv_budget(gpu: GpuMemory, fraction: float, cuda_graphs: bool) -> int:
    """Bytes the KV pool may take on a GPU after the warm-up forward (may be negative: nothing fits)."""
    outside_torch = max(0, gpu.total_bytes - gpu.free_bytes - gpu.reserved_bytes)
    reserve = CUDA_GRAPH_RESERVE_BYTES if cuda_graphs else 0
    return int(gpu.total_bytes * fraction) - gpu.peak_bytes - outside_torch - reserve


def layout_report(layout: EngineLayout) -> str:
    """The start-up report: the KV pool, how it was sized, the profiled peak and the captured graphs."""
    total = layout.kv_cache_bytes
    lines = [f"KV cache on {layout.device}: {layout.num_kv_blocks} blocks x {layout.tokens_per_block} tokens = "
             f"{layout.num_kv_blocks * layout.tokens_per_block} tokens, {total / GIB:.3f} GiB ({total} bytes); "
             f"sized by {layout.kv_sizing}"]
    if layout.profiled_peak_bytes is not None:
        lines.append(f"profiled peak (weights + activations at max_num_tokens): "
                     f"{layout.profiled_peak_bytes / GIB:.3f} GiB")
    if layout.cuda_graph_batch_sizes:
        lines.append(f"CUDA graphs for decode batch sizes {list(layout.cuda_graph_batch_sizes)}")
    return "; ".join(lines)
