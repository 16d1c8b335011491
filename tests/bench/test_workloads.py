"""trtserve-bench workloads without a server: output lengths spread over a range (`--output-len 16:256`).

The option parses into a range (and bad ranges are refused naming the flag); each request's length is
drawn uniformly from a stream seeded by the seed and the level alone, so two builders with different
tokenizers (trtserve's, another server's) give the same lengths in the same order, multi-turn sessions
included, and another seed or level gives others. That the HF baseline and the served run then
generate and count those lengths: tests/bench/test_bench.py::test_hf_baseline_side_by_side.
"""
from __future__ import annotations

from collections.abc import Sequence

import pytest

from bench.cli import build_parser, workload_spec
from bench.workloads import IntRange, WorkloadBuilder, WorkloadSpec, output_lens


class CharTokenizer:
    """One character per id (round-trips exactly); `offset` makes a different tokenizer."""

    def __init__(self, vocab_size: int, offset: int = 0x100) -> None:
        self.vocab_size = vocab_size
        self._offset = offset

    def encode(self, text: str) -> list[int]:
        return [ord(c) - self._offset for c in text]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(chr(self._offset + i) for i in token_ids)

    def image_tokens(self, data: bytes) -> int:
        raise AssertionError("no images here")


def _lens(builder: WorkloadBuilder, level: str, num_requests: int) -> list[int]:
    return [turn.output_len for session in builder.sessions(level, num_requests) for turn in session.turns]


def test_output_len_range_parses_and_bad_ranges_are_named() -> None:
    spec = workload_spec(build_parser().parse_args(["--output-len", "16:256", "--seed", "3"]))
    assert spec.output_len == IntRange(16, 256) and spec.seed == 3
    assert "out=16:256" in spec.label() and spec.describe()["output_len"] == "16:256"
    assert workload_spec(build_parser().parse_args([])).output_len == IntRange(64, 64)
    for bad in ("256:16", "a:b", "1:2:3", "-4", ""):
        with pytest.raises(ValueError, match="--output-len"):
            IntRange.parse(bad, "--output-len")


def test_seeded_lengths_are_the_same_for_every_tokenizer_and_spread_over_the_range() -> None:
    spec = WorkloadSpec(input_len=IntRange(8, 12), output_len=IntRange(16, 256), seed=7)
    ours = WorkloadBuilder(spec, CharTokenizer(300))
    theirs = WorkloadBuilder(spec, CharTokenizer(150, offset=0x400))
    lengths = _lens(ours, "native-c16", 32)
    assert lengths == _lens(theirs, "native-c16", 32) == output_lens(spec, "native-c16", 32)
    assert all(16 <= n <= 256 for n in lengths) and max(lengths) - min(lengths) > 100
    assert [s.turns[0].token_ids for s in ours.sessions("native-c16", 4)] != \
        [s.turns[0].token_ids for s in theirs.sessions("native-c16", 4)], "the prompts do differ"
    assert _lens(ours, "native-c16", 32) == lengths, "the same level again: the same lengths"
    assert _lens(ours, "native-c4", 32) != lengths
    assert _lens(WorkloadBuilder(WorkloadSpec(output_len=IntRange(16, 256), seed=8), CharTokenizer(300)),
                 "native-c16", 32) != lengths
    multi = WorkloadBuilder(WorkloadSpec(input_len=IntRange(4, 4), output_len=IntRange(16, 256), seed=7,
                                         num_turns=3), CharTokenizer(300))
    assert _lens(multi, "native-c16", 32) == lengths, "turns take the lengths in sending order"
    fixed = WorkloadBuilder(WorkloadSpec(input_len=IntRange(4, 4), output_len=IntRange(64, 64)), CharTokenizer(300))
    assert set(_lens(fixed, "native-c1", 5)) == {64}
