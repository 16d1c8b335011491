"""What the paged-attention ops need to know about a packed batch, on the host and on the device.

What it is for: one record per forward step, built once (runtime/executor/forward_batch.py)
and read by every layer's attention call. The reference op reads the host lists; the
Triton kernels read only the device tensors and the static shapes, so a decode step
can be captured in a CUDA graph and replayed with new values in the same buffers.
Not for: the KV block ownership (runtime/core/kv_cache.py) or the cache memory itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
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
        num_seqs = len(seq_lens)
        packed = np.empty(2 * num_seqs + 1, dtype=np.int32)       # seq_lens, then query_start_loc
        packed[:num_seqs] = seq_lens
        packed[num_seqs] = 0
        if num_seqs:
            np.cumsum(query_lens, dtype=np.int32, out=packed[num_seqs + 1:])
        return cls._from_packed(block_tables, packed, list(seq_lens), list(query_lens),
                                max(query_lens, default=0), device, split_context)

    @classmethod
    def build_decode(cls, block_tables: torch.Tensor, seq_lens: list[int], device: torch.device,
                     split_context: int = 0) -> AttentionMetadata:
        """One query token per sequence (a decode step): the query starts are 0..B, no cumulative sum."""
        num_seqs = len(seq_lens)
        if num_seqs != block_tables.shape[0]:
            raise ValueError(f"seq_lens ({num_seqs}) and block_tables ({block_tables.shape[0]} rows) "
                             "must describe the same sequences")
        packed = np.array(seq_lens + list(range(num_seqs + 1)), dtype=np.int32)
        return cls._from_packed(block_tables, packed, seq_lens, [1] * num_seqs, 1 if num_seqs else 0,
                                device, split_context)

    @classmethod
    def _from_packed(cls, block_tables: torch.Tensor, packed: np.ndarray, seq_lens: list[int],
                     query_lens: list[int], max_query_len: int, device: torch.device,
                     split_context: int) -> AttentionMetadata:
        """`packed`: int32 [2B + 1], the sequence lengths then the query start offsets."""
        num_seqs = len(seq_lens)
        if device.type == "cpu":        # numpy views: slicing a tensor goes through the dispatcher
            seq_lens_tensor = torch.from_numpy(packed[:num_seqs])
            query_start_loc = torch.from_numpy(packed[num_seqs:])
        else:                           # one host-to-device copy
            on_device = to_device(torch.from_numpy(packed), device)
            seq_lens_tensor, query_start_loc = on_device[:num_seqs], on_device[num_seqs:]
        return cls(to_device(block_tables, device), seq_lens_tensor, query_start_loc, seq_lens, query_lens,
                   max_query_len, split_context)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA through pinned memory without blocking the host (a tensor
    already on a GPU is moved, or returned, as it is).

    The pinned copy comes from PyTorch's caching host allocator, which keeps it until
    the copy has run, so the caller may drop it at once.
    """
    if device.type == "cpu" and host.device.type == "cpu":
        return host                     # already there (`.to` would return it too, through the dispatcher)
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
