"""Teacher-forced logits of the decoder through every attention path, and HF's for the same tokens.

Shared by the CPU test (tiny model, Triton ops in the interpreter, graph runner without capture) and the
GPU test (real shape, bf16, captured graphs). Each sequence is a prompt plus a forced continuation.
Prefill: the first two prompts whole, the others in two chunks (chunked prefill over the paged cache);
then the continuation one token per step for all sequences together, through the CUDA-graph runner.
Row k of a sequence's result predicts token len(prompt) + k (the prefill's last row first).
"""
from __future__ import annotations

import torch

from runtime.executor.cuda_graphs import CudaGraphRunner
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel


def engine_logits(model: DecoderModel, prompts: list[list[int]], continuations: list[list[int]], block_size: int,
                  capture: bool) -> list[torch.Tensor]:
    """[len(continuation), vocab] float32 logits per sequence (needs 2 <= len(prompts) <= 4)."""
    device = model.device
    lengths = [len(p) + len(c) for p, c in zip(prompts, continuations)]
    blocks_per_seq = -(-max(lengths) // block_size)
    tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))[::-1] for i in range(len(prompts))]
    kv = KVStorage(model.cfg, blocks_per_seq * len(prompts), block_size, model.dtype, device)
    runner = CudaGraphRunner(model, kv, max_batch_size=4, max_blocks_per_seq=blocks_per_seq, capture=capture)
    rows: list[list[torch.Tensor]] = [[] for _ in prompts]
    first = [SequenceChunk(p if i < 2 else p[:len(p) // 2], 0, tables[i], i < 2) for i, p in enumerate(prompts)]
    logits = model.forward(ForwardBatch.build(first, block_size, device), kv)
    rows[0].append(logits[0])
    rows[1].append(logits[1])
    rest = [SequenceChunk(p[len(p) // 2:], len(p) // 2, tables[i]) for i, p in enumerate(prompts) if i >= 2]
    logits = model.forward(ForwardBatch.build(rest, block_size, device), kv)
    for row, i in enumerate(range(2, len(prompts))):
        rows[i].append(logits[row])
    for step in range(len(continuations[0]) - 1):
        chunks = [SequenceChunk([c[step]], len(p) + step, tables[i])
                  for i, (p, c) in enumerate(zip(prompts, continuations))]
        batch = ForwardBatch.build(chunks, block_size, device, split_context=blocks_per_seq * block_size)
        assert runner.can_run(batch)
        logits = runner.run(batch)
        for i in range(len(prompts)):
            rows[i].append(logits[i])
    return [torch.stack(r).float() for r in rows]


def hf_logits(hf: torch.nn.Module, prompts: list[list[int]], continuations: list[list[int]],
              device: torch.device) -> list[torch.Tensor]:
    """HF's logits at the same positions (one full forward per sequence)."""
    out = []
    with torch.inference_mode():
        for p, c in zip(prompts, continuations):
            ids = torch.tensor([p + c[:-1]], device=device)
            out.append(hf(ids).logits[0, len(p) - 1:].float())
    return out
