"""Tokenizers for the benchmark, and prompts that tokenize to an exact number of tokens.

What it is for: `RemoteTokenizer` (the server's own Tokenize / Detokenize RPCs
of the native API, so counts match what the engine sees), `LocalTokenizer`
(an HF tokenizer directory, `--tokenizer DIR`, for servers without that API:
a stock Triton server or another OpenAI-compatible server), and
`exact_prompt`, which turns random token ids into text whose re-tokenization
has exactly the asked length (and, for shared prefixes, starts with the given
prefix ids). Sending that text over the Triton API or its ids over the native
API gives the engine the same prompt.
Not for: what to send at which rate (workloads.py, loadgen.py).
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Protocol

from grpc_service.client import NativeClient
from grpc_service.proto import trtserve_pb2 as pb

MAX_ROUNDS = 64


class Tokenizer(Protocol):
    # Ids [0, vocab_size) decode to text: the tokenizer's base vocabulary, without its added (special) tokens.
    # Not the model's vocab_size, which can be far larger (padded rows; a random-weight qwen2.5-0.5b build has
    # 151,936 rows over a 2,048-id tokenizer): the ids above the tokenizer's decode to nothing.
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def image_tokens(self, data: bytes) -> int: ...


class RemoteTokenizer:
    """The engine's tokenizer through the native API (no special tokens added, as the ensemble does)."""

    def __init__(self, client: NativeClient, card: pb.ModelCard) -> None:
        self.client = client
        self.model = card.name
        # A server from before ModelCard.tokenizer_vocab_size sends 0 there: fall back to the model's size.
        self.vocab_size = card.tokenizer_vocab_size or card.vocab_size
        self._image_tokens: dict[str, int] = {}

    def encode(self, text: str) -> list[int]:
        return self.client.tokenize(text, model=self.model)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.client.detokenize(token_ids, model=self.model)

    def image_tokens(self, data: bytes) -> int:
        """Prompt tokens one image adds (its vision block), as the difference of two chat tokenizations."""
        key = hashlib.sha256(data).hexdigest()
        if key not in self._image_tokens:
            with_image = pb.ChatMessage(role="user", parts=[pb.ContentPart(image=pb.Image(data=data)),
                                                            pb.ContentPart(text="x")])
            num_tokens = len(self.client.tokenize([with_image], model=self.model))
            self._image_tokens[key] = num_tokens - self._num_text_tokens
        return self._image_tokens[key]

    @cached_property
    def _num_text_tokens(self) -> int:
        """The tokens of the image chat without its image."""
        return len(self.client.tokenize([pb.ChatMessage(role="user", content="x")], model=self.model))


class LocalTokenizer:
    """An HF tokenizer directory (the engine's `tokenizer/` or the model's own); no special tokens added."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(path)
        self.vocab_size = int(self._tokenizer.vocab_size)       # HF: the base vocabulary, no added tokens

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self._tokenizer(text, add_special_tokens=False)["input_ids"]]

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def image_tokens(self, data: bytes) -> int:
        raise PromptLengthError("counting image tokens needs the server's own tokenizer (the trtserve native "
                                "API); without it, benchmark text workloads")


@dataclass(frozen=True, slots=True)
class ExactPrompt:
    text: str
    token_ids: tuple[int, ...]


class PromptLengthError(RuntimeError):
    """No text with exactly the asked number of tokens was found (a tokenizer that merges across words)."""


def exact_prompt(tokenizer: Tokenizer, num_tokens: int, rng: random.Random,
                 prefix: ExactPrompt | None = None) -> ExactPrompt:
    """Text that tokenizes to `num_tokens` ids after `prefix` (whose ids it keeps), from random ids."""
    head_text = prefix.text if prefix else ""
    head_ids = list(prefix.token_ids) if prefix else []
    high = max(tokenizer.vocab_size, 2)
    tail = [rng.randrange(high) for _ in range(num_tokens)]
    for round_index in range(MAX_ROUNDS):
        text = head_text + tokenizer.decode(tail)
        ids = tokenizer.encode(text)
        if ids[:len(head_ids)] != head_ids:           # the tail merged into the prefix: start the tail afresh
            tail = [rng.randrange(high) for _ in range(num_tokens)]
            continue
        tail = ids[len(head_ids):]
        if len(tail) == num_tokens:
            return ExactPrompt(text, tuple(ids))
        # Re-draw the last few ids (more each round): a cut through a multi-byte character or a merge
        # would otherwise give the same wrong length again.
        keep = max(min(len(tail), num_tokens) - 1 - round_index, 0)
        tail = tail[:keep] + [rng.randrange(high) for _ in range(num_tokens - keep)]
    raise PromptLengthError(f"no text of exactly {num_tokens} tokens found in {MAX_ROUNDS} rounds "
                            f"(prefix {len(head_ids)} tokens, ids drawn below {high})")
