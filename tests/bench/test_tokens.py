"""trtserve-bench's exact-length prompts when the model has far more ids than its tokenizer.

A random-weight qwen2.5-0.5b build has 151,936 embedding rows over the offline 2,048-id tokenizer (the one
builder/source.py gives every random-weight text preset); real checkpoints pad their rows too. The prompt
search must draw ids from the tokenizer's base vocabulary, which the server's ModelCard now reports as
`tokenizer_vocab_size`: drawn from the model's rows, almost every id decodes to nothing and no text of the
asked length is found (the bug seen serving qwen2.5-0.5b). That the served prompt-token counts equal the
asked lengths: tests/bench/test_bench.py.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from bench.tokens import LocalTokenizer, PromptLengthError, RemoteTokenizer, exact_prompt
from builder.presets import load_preset
from builder.tokenizer import VOCAB_SIZE, offline_tokenizer_dir
from grpc_service.client import NativeClient
from tests.helpers.grpc_fixtures import ServerProcess


def test_exact_prompts_with_the_tokenizer_of_a_much_larger_model(cache_dir: Path) -> None:
    tokenizer = LocalTokenizer(str(offline_tokenizer_dir(cache_dir)))
    model_vocab_size = int(load_preset("qwen2.5-0.5b").hf_config["vocab_size"])
    assert tokenizer.vocab_size == VOCAB_SIZE and model_vocab_size == 151936
    rng = random.Random(0)
    prefix = exact_prompt(tokenizer, 32, rng)
    for num_tokens, head in ((64, None), (32, None), (1, None), (200, None), (32, prefix)):
        prompt = exact_prompt(tokenizer, num_tokens, rng, head)
        ids = tokenizer.encode(prompt.text)
        assert tuple(ids) == prompt.token_ids and len(ids) == num_tokens + (32 if head else 0)
        assert max(ids) < VOCAB_SIZE
        if head is not None:
            assert prompt.token_ids[:32] == prefix.token_ids
    tokenizer.vocab_size = model_vocab_size        # the old draw: the model's rows, almost all decode to nothing
    with pytest.raises(PromptLengthError, match="exactly 64 tokens .* ids drawn below 151936"):
        exact_prompt(tokenizer, 64, random.Random(0))


def test_the_server_reports_its_tokenizer_vocabulary(grpc_server: ServerProcess, tiny_engine_dir: Path) -> None:
    client = NativeClient(grpc_server.target, timeout_s=30.0)
    try:
        card = client.models()[0]
        remote = RemoteTokenizer(client, card)
        local = LocalTokenizer(str(tiny_engine_dir / "tokenizer"))
        assert card.tokenizer_vocab_size == remote.vocab_size == local.vocab_size == VOCAB_SIZE
        assert card.vocab_size >= card.tokenizer_vocab_size
        prompt = exact_prompt(remote, 48, random.Random(1))
        assert len(client.tokenize(prompt.text, model=card.name)) == 48
    finally:
        client.close()
