"""What the paged-attention ops need to know about a packed batch, on the host and on the device.

What it is for: one record per forward step, built once (runtime/executor/forward_batch.py)
and read by every layer's attention call. The reference op reads the host lists; the
Triton kernels read only the device tensors and the static shapes, so a decode step
can be captured in a CUDA graph and replayed with new values in the same buffers.
Not for: the KV block ownership (runtime/core/kv_cache.py) or the cache memory itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class AttentionMetadata:
    """Sequences packed in order; sequence i owns query rows [query_start_loc[i], query_start_loc[i + 1])."""

    block_tables: torch.Tensor      # [B, max_blocks] int64 block ids (entries past a sequence's blocks: unused)
    seq_lens_tensor: torch.Tensor   # [B] int32: tokens in the cache after this step (0: a padding row)
    query_start_loc: torch.Tensor   # [B + 1] int32: cumulative query lengths
    seq_lens: list[int]             # host copy of seq_lens_tensor (reference op, eager paths)
    query_lens: list[int]           # host copy of the query lengths
    max_query_len: int
    # decode: the context length split-K divides (static, e.g. the engine's max_seq_len, so eager steps and
    # captured graphs split alike); 0: the block-table width
    split_context: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.block_tables.shape[0])

    @property
    def decode_only(self) -> bool:
        """Every sequence computes exactly one token (the shape a CUDA graph captures)."""
        return self.max_query_len == 1

    @classmethod
    def build(cls, block_tables: torch.Tensor, seq_lens: list[int], query_lens: list[int],
              device: torch.device, split_context: int = 0) -> AttentionMetadata:
        """Host lists -> the device tensors, in one host-to-device copy (pinned, non-blocking on CUDA)."""
        if len(seq_lens) != len(query_lens) or len(seq_lens) != block_tables.shape[0]:
            raise ValueError(f"seq_lens ({len(seq_lens)}), query_lens ({len(query_lens)}) and block_tables "
                             f"({block_tables.shape[0]} rows) must describe the same sequences")
        starts = [0]
        for n in query_lens:
            starts.append(starts[-1] + n)
        packed = to_device(torch.tensor(seq_lens + starts, dtype=torch.int32), device)
        num_seqs = len(seq_lens)
        return cls(to_device(block_tables, device), packed[:num_seqs], packed[num_seqs:], list(seq_lens),
                   list(query_lens), max(query_lens, default=0), split_context)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory without blocking the host (a tensor
    already on a GPU is moved, or returned, as it is).

    The pinned copy comes from PyTorch's caching host allocator, which keeps it until
    the copy has run, so the caller may drop it at once.
    """
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
