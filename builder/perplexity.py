"""Perplexity on a fixed real text: the quality measure every build records (engine beside HF).

What it is for: one reusable measure of model quality on real text, for
`validation.json` and for comparing quantized builds with their source. The
text (builder/configs/text/plain_facts.txt, public domain) is tokenized by the
engine's tokenizer, cut into non-overlapping windows of at most `WINDOW`
tokens, and each window is scored from an empty cache: every token after the
first in a window is predicted, and perplexity = exp(mean negative
log-likelihood), summed in float64. The same windows go through the engine's
`DecoderModel` (one prefill per window, logits at every position) and through
the HF model, so the two numbers are directly comparable.
Not for: benchmarking, or comparing models with different tokenizers (a
perplexity is per token of that model's tokenizer).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from builder.presets import CONFIGS_DIR
from runtime.executor.forward_batch import ForwardBatch, SequenceChunk
from runtime.executor.kv_storage import KVStorage
from runtime.executor.model import DecoderModel

TEXT_PATH = CONFIGS_DIR / "text" / "plain_facts.txt"
TEXT_VERSION = 1
WINDOW = 512               # tokens per scored window (capped by the engine's max_seq_len)
MAX_TEXT_TOKENS = 4096     # the text is about 3,300 tokens for a 49k-token BPE vocabulary

WindowLogits = Callable[[list[int]], torch.Tensor]   # token ids [n] -> float32 logits [n, vocab]


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    perplexity: float
    num_scored_tokens: int
    num_windows: int


def reference_text(path: Path = TEXT_PATH) -> str:
    """The text without its `# ` header lines."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and (lines[0].startswith("#") or not lines[0].strip()):
        lines.pop(0)
    return "\n".join(lines) + "\n"


def text_token_ids(tokenizer: Any, max_tokens: int = MAX_TEXT_TOKENS) -> list[int]:
    """The text's token ids under `tokenizer` (no special tokens), at most `max_tokens`."""
    return list(tokenizer(reference_text(), add_special_tokens=False)["input_ids"])[:max_tokens]


def perplexity(window_logits: WindowLogits, token_ids: Sequence[int], window: int) -> PerplexityResult:
    """exp(mean NLL) over non-overlapping windows, each scored from an empty context."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    total_nll, count, num_windows = 0.0, 0, 0
    for start in range(0, len(token_ids), window):
        ids = list(token_ids[start:start + window])
        if len(ids) < 2:
            break
        logits = window_logits(ids)[:-1].float()
        targets = torch.tensor(ids[1:])
        log_probs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0]
        total_nll -= float(log_probs.double().sum())
        count += len(ids) - 1
        num_windows += 1
    if count == 0:
        raise ValueError(f"perplexity needs at least 2 tokens, got {len(token_ids)}")
    return PerplexityResult(math.exp(total_nll / count), count, num_windows)


def engine_window_logits(model: DecoderModel, window: int, block_size: int) -> WindowLogits:
    """Logits at every position of one prefill through the engine's model (fresh KV each window)."""
    num_blocks = -(-window // block_size)
    kv = KVStorage(model.cfg, num_blocks, block_size, model.dtype, model.device)
    block_ids = list(range(num_blocks))

    def logits(ids: list[int]) -> torch.Tensor:
        batch = ForwardBatch.build([SequenceChunk(ids, 0, block_ids)], block_size, model.device)
        batch = replace(batch, logits_indices=torch.arange(batch.num_tokens, device=model.device))
        return model.forward(batch, kv).cpu()

    return logits


def hf_window_logits(hf: Any) -> WindowLogits:
    @torch.inference_mode()
    def logits(ids: list[int]) -> torch.Tensor:
        return hf(torch.tensor([ids])).logits[0].float()

    return logits


def perplexity_report(model: DecoderModel, hf: Any, tokenizer: Any, max_seq_len: int, block_size: int,
                      max_tokens: int = MAX_TEXT_TOKENS) -> dict[str, Any]:
    """The `validation.json` entry: engine and HF perplexity on the same windows (the first `max_tokens`
    tokens of the text), and their relative gap."""
    window = min(WINDOW, max_seq_len, max_tokens)
    token_ids = text_token_ids(tokenizer, max_tokens)
    ours = perplexity(engine_window_logits(model, window, block_size), token_ids, window)
    ref = perplexity(hf_window_logits(hf), token_ids, window)
    return {
        "text": TEXT_PATH.name, "text_version": TEXT_VERSION, "window": window,
        "num_scored_tokens": ours.num_scored_tokens, "num_windows": ours.num_windows,
        "engine": ours.perplexity, "reference": ref.perplexity,
        "rel_diff": abs(ours.perplexity - ref.perplexity) / ref.perplexity,
    }
