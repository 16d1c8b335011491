"""One sequence at a time through the paged executor: prefill, then decode.

What it is for: the simplest correct loop over `DecoderModel`, used by the
builder's validation (teacher-forced comparison with HF) and by tests. The
sequence owns blocks 0..n-1 of a private KV storage.
Not for: serving several requests (runtime/core/engine_core.py batches them).
"""
from __future__ import annotations

import torch

from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel


class SequentialRunner:
    def __init__(self, model: DecoderModel, max_seq_len: int, block_size: int = 16) -> None:
        self.model = model
        self.block_size = block_size
        num_blocks = -(-max_seq_len // block_size)
        self.block_ids = list(range(num_blocks))
        self.max_seq_len = max_seq_len
        self.kv = KVStorage(model.cfg, num_blocks, block_size, model.dtype, model.device)
        self.num_tokens = 0

    def reset(self) -> None:
        self.num_tokens = 0

    def feed(self, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Append tokens; return logits of the last token [V], or of every fed token [n, V]."""
        end = self.num_tokens + len(token_ids)
        if end > self.max_seq_len:
            raise ValueError(f"sequence length {end} exceeds max_seq_len {self.max_seq_len}")
        if all_logits:
            chunks = [SequenceChunk([t], self.num_tokens + j, self.block_ids) for j, t in enumerate(token_ids)]
            logits = [self._run([c]) for c in chunks]
            self.num_tokens = end
            return torch.cat(logits, dim=0)
        logits = self._run([SequenceChunk(token_ids, self.num_tokens, self.block_ids)])
        self.num_tokens = end
        return logits[0]

    def _run(self, chunks: list[SequenceChunk]) -> torch.Tensor:
        batch = ForwardBatch.build(chunks, self.block_size, self.model.device)
        return self.model.forward(batch, self.kv)

    def greedy(self, prompt_ids: list[int], max_tokens: int) -> list[int]:
        self.reset()
        logits = self.feed(prompt_ids)
        out: list[int] = []
        for _ in range(max_tokens):
            out.append(int(logits.argmax()))
            if len(out) == max_tokens:
                break
            logits = self.feed([out[-1]])
        return out
