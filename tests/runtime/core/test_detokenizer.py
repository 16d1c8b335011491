"""IncrementalDetokenizer against a tiny byte-level BPE trained in the test.

Properties checked for many seeded-random id sequences, fed in random chunks:
the deltas (plus flush) concatenate to `tokenizer.decode(output_ids)`; after
every call the text emitted so far is the full decode with only a trailing run
of U+FFFD held back (so a delta never splits a UTF-8 character, and nothing else
is held); each decode call covers a short window, not the whole output.
"""
from __future__ import annotations

import random
from typing import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from runtime.core.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, direct_decode
from runtime.core.request import RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.core.stop_checker import StopChecker

SPECIAL_TOKENS = ["<|eos|>", "<|im_start|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Streaming text, one token at a time.",
    "Ünïcödé àccents: café, naïve, façade, smörgåsbord, Ærøskøbing.",
    "中文文本：今天天气很好，我们去公园散步吧。机器学习和自然语言处理。",
    "日本語のテキスト：こんにちは世界、東京は大きな都市です。",
    "한국어 문장도 조금 넣어 봅시다. 안녕하세요!",
    "Emoji 🙂😀🎉🚀👍🏽 and flags 🇯🇵🇫🇷, zero-width joiner 👩‍💻 family 👨‍👩‍👧.",
    "Mixed: 价格是 ¥100 or €42 — “quotes” ‘single’ … ellipsis ±×÷ ∑∫√ Ω≈ç.",
] * 4


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>",
                                   clean_up_tokenization_spaces=False)


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call received."""

    def __init__(self, inner: PreTrainedTokenizerFast) -> None:
        self.inner = inner
        self.decode_lengths: list[int] = []

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.decode_lengths.append(len(token_ids))
        return self.inner.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


def stream(tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int],
           rng: random.Random, skip_special_tokens: bool = True) -> list[str]:
    """Feed `output` in random chunks, checking the per-call property; return all deltas."""
    detok = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip_special_tokens)
    deltas: list[str] = []
    pos = 0
    while pos < len(output):
        size = rng.choice((1, 1, 1, 2, 3))
        deltas.append(detok.add_tokens(output[pos:pos + size]))
        pos += size
        full = tokenizer.decode(output[:pos], skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == full.rstrip(REPLACEMENT_CHAR) or "".join(deltas) == full, (
            output[:pos], deltas, full)
    deltas.append(detok.flush())
    assert detok.num_output_tokens == len(output)
    return deltas


def char_split_ids(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> list[int]:
    """Token ids of random multilingual text: mostly valid UTF-8 split mid-character."""
    pieces = [line[rng.randrange(len(line)):][:rng.randint(1, 30)] for line in CORPUS[:7]]
    rng.shuffle(pieces)
    return tokenizer.encode("".join(pieces), add_special_tokens=False)


def test_multibyte_text_streams_without_replacement_chars(tokenizer) -> None:
    rng = random.Random(0)
    text = "Hi 中文文本 🙂😀🎉 café 👩‍💻 日本語 ∑∫√"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert any(REPLACEMENT_CHAR in tokenizer.decode([i]) for i in ids)   # really split
    deltas = stream(tokenizer, [], ids, rng)
    assert "".join(deltas) == text
    assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_random_text_sequences(tokenizer) -> None:
    rng = random.Random(1)
    for _ in range(60):
        ids = char_split_ids(tokenizer, rng)
        prompt = char_split_ids(tokenizer, rng)[:rng.randint(0, 8)]
        deltas = stream(tokenizer, prompt, ids, rng)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)
        assert all(REPLACEMENT_CHAR not in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_id_sequences(tokenizer, skip_special_tokens: bool) -> None:
    """Arbitrary ids (invalid UTF-8, special tokens): deltas still add up to decode()."""
    rng = random.Random(2)
    vocab_size = len(tokenizer)
    for _ in range(150):
        ids = [rng.randrange(vocab_size) for _ in range(rng.randint(1, 25))]
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(0, 7))]
        deltas = stream(tokenizer, prompt, ids, rng, skip_special_tokens)
        full = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == full
        if REPLACEMENT_CHAR not in full:
            assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_prompt_ending_mid_character_is_not_glued_to_output(tokenizer) -> None:
    emoji = tokenizer.encode("🚀", add_special_tokens=False)
    assert len(emoji) > 1
    prompt = tokenizer.encode("go ", add_special_tokens=False) + emoji[:1]
    output = emoji[1:] + tokenizer.encode(" ok", add_special_tokens=False)
    deltas = stream(tokenizer, prompt, output, random.Random(3))
    assert "".join(deltas) == tokenizer.decode(output)
    assert tokenizer.decode(output).startswith(REPLACEMENT_CHAR)   # orphan bytes, as decode()


def test_special_tokens(tokenizer) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    ids = tokenizer.encode("abc 中", add_special_tokens=False) + [eos]
    assert "".join(stream(tokenizer, [], ids, random.Random(4))) == "abc 中"
    shown = stream(tokenizer, [], ids, random.Random(4), skip_special_tokens=False)
    assert "".join(shown) == "abc 中<|eos|>"


def test_decode_window_stays_small(tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    text = " ".join(CORPUS) * 3
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(counting, ids[:20])
    out = "".join(detok.add_tokens([i]) for i in ids) + detok.flush()
    assert out == text
    # The window spans the last emitted group plus a run of tokens that each end
    # mid-character (this tiny vocabulary has runs of up to 7 in its CJK text):
    # bounded by the text's structure, not by the output length.
    assert max(counting.decode_lengths) <= 16
    assert sum(counting.decode_lengths) / len(counting.decode_lengths) < 5


def generate(tokenizer: PreTrainedTokenizerFast, ids: list[int],
             params: SamplingParams) -> tuple[str, RequestStatus | None, int | str | None]:
    """The engine's per-token sequence: detokenize, then ask the stop checker."""
    detok = IncrementalDetokenizer(tokenizer, [])
    checker = StopChecker(params)
    text = ""
    for n, token_id in enumerate(ids, start=1):
        decision = checker.update(token_id, n, detok.add_tokens([token_id]), flush=detok.flush)
        text += decision.emit_text
        if decision.finish is not None:
            return text, decision.finish, decision.stop_reason
    return text, None, None


def test_with_stop_checker_stop_string_of_split_characters(tokenizer) -> None:
    full = "今天天气很好，我们去公园散步吧。"
    ids = tokenizer.encode(full, add_special_tokens=False)
    for stop in ("公园", "很好，我", "。"):
        params = SamplingParams(max_tokens=100, stop=(stop,))
        text, finish, reason = generate(tokenizer, ids, params)
        assert (text, finish, reason) == (full[:full.index(stop)],
                                          RequestStatus.FINISHED_STOPPED, stop)


def test_with_stop_checker_length_ends_mid_character(tokenizer) -> None:
    ids = tokenizer.encode("ab 🚀🎉", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids))
               if tokenizer.decode(ids[:n]).endswith(REPLACEMENT_CHAR))
    text, finish, _ = generate(tokenizer, ids, SamplingParams(max_tokens=cut, stop=("zz",)))
    assert finish == RequestStatus.FINISHED_LENGTH
    assert text == tokenizer.decode(ids[:cut])


def test_direct_decode_is_the_rust_decode_with_the_same_text(tokenizer) -> None:
    """The fast path (no transformers Python per call) is taken for a stock fast tokenizer without clean-up and
    gives decode()'s text for arbitrary ids, special tokens shown or skipped; with clean-up it is decode()."""
    fast = direct_decode(tokenizer)
    assert fast == tokenizer.backend_tokenizer.decode
    rng = random.Random(5)
    for _ in range(200):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert fast(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)
    cleaning = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, clean_up_tokenization_spaces=True)
    assert direct_decode(cleaning) == cleaning.decode
    assert direct_decode(CountingTokenizer(tokenizer)).__self__.__class__ is CountingTokenizer
