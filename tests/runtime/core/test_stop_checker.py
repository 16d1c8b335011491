"""StopChecker: stop strings across token boundaries, hold-back and flush,
EOS / stop tokens / length, min_tokens, precedence."""
from __future__ import annotations

import random

import pytest

from runtime.core.request import RequestStatus
from runtime.sampling_params import SamplingParams
from runtime.core.stop_checker import StopChecker, StopCheckerFinishedError, StopDecision

EOS = 2
TEXT_TOKEN = 50
STOPPED = RequestStatus.FINISHED_STOPPED
LENGTH = RequestStatus.FINISHED_LENGTH


def run(params: SamplingParams, deltas: list[str], token_ids: list[int] | None = None,
        eos: tuple[int, ...] = (EOS,)) -> list[StopDecision]:
    """Feed deltas (one per token) until the checker finishes; return its decisions."""
    checker = StopChecker(params, eos)
    token_ids = token_ids or [TEXT_TOKEN] * len(deltas)
    decisions = []
    for n, (token_id, delta) in enumerate(zip(token_ids, deltas), start=1):
        decisions.append(checker.update(token_id, n, delta))
        if decisions[-1].finish is not None:
            assert checker.finished
            break
    return decisions


def emitted(decisions: list[StopDecision]) -> str:
    return "".join(d.emit_text for d in decisions)


def test_stop_string_split_across_tokens() -> None:
    decisions = run(SamplingParams(stop=("STOP",)), ["Hel", "lo ST", "OP more", "x"])
    assert [d.emit_text for d in decisions] == ["Hel", "lo ", ""]
    assert decisions[-1].finish == STOPPED and decisions[-1].stop_reason == "STOP"


def test_held_prefix_released_when_not_completed() -> None:
    decisions = run(SamplingParams(stop=("STOP",)), ["a S", "T", "AR", "t"])
    assert [d.emit_text for d in decisions] == ["a ", "", "STAR", "t"]
    assert all(d.finish is None for d in decisions)


@pytest.mark.parametrize(("token_id", "max_tokens", "finish", "reason"), [
    (EOS, 16, STOPPED, None), (7, 16, STOPPED, 7), (TEXT_TOKEN, 2, LENGTH, None),
])
def test_held_text_flushed_when_finishing_for_another_reason(
        token_id: int, max_tokens: int, finish: RequestStatus, reason: int | None) -> None:
    params = SamplingParams(stop=("STOP",), stop_token_ids=(7,), max_tokens=max_tokens)
    decisions = run(params, ["go S", "T"], [TEXT_TOKEN, token_id])
    assert [d.emit_text for d in decisions] == ["go ", "ST"]
    assert decisions[-1].finish == finish and decisions[-1].stop_reason == reason


def test_flush_callable_adds_detokenizer_tail_only_on_token_finish() -> None:
    calls: list[int] = []

    def flush() -> str:
        calls.append(1)
        return "\ufffd"

    checker = StopChecker(SamplingParams(max_tokens=2), (EOS,))
    assert checker.update(TEXT_TOKEN, 1, "a", flush=flush) == ("a", None, None)
    assert not calls
    assert checker.update(TEXT_TOKEN, 2, "b", flush=flush) == ("b\ufffd", LENGTH, None)
    assert calls == [1]


def test_multiple_stop_strings_first_completed_wins() -> None:
    decisions = run(SamplingParams(stop=("abcd", "bc")), ["xabcd"])
    assert decisions[-1] == ("xa", STOPPED, "bc")
    decisions = run(SamplingParams(stop=("bc", "abc")), ["xab", "c"])
    assert emitted(decisions) == "x" and decisions[-1].stop_reason == "abc"
    decisions = run(SamplingParams(stop=("###", "\n\n")), ["one\n", "two#", "#\n", "\nx"])
    assert emitted(decisions) == "one\ntwo##" and decisions[-1].stop_reason == "\n\n"


def reference(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Text arriving one character at a time: truncate at the first completed stop string."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            stop = max(done, key=len)
            return text[:end - len(stop)], stop
    return text, None


def test_random_splits_match_reference() -> None:
    rng = random.Random(0)
    stop_sets = [("ab",), ("ab", "ba\n"), ("aab", "b\nb", "a"), ("\n\n", "ba"), ("abab", "bab")]
    for _ in range(400):
        stops = rng.choice(stop_sets)
        text = "".join(rng.choice("ab\n") for _ in range(rng.randint(0, 20)))
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 6)))
                      if len(text) > 1 else [])
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])] + ["", ""]
        decisions = run(SamplingParams(stop=stops, max_tokens=len(deltas)), deltas)
        expected_text, expected_stop = reference(text, stops)
        assert emitted(decisions) == expected_text, (text, stops, deltas)
        last = decisions[-1]
        if expected_stop is None:
            assert (last.finish, last.stop_reason) == (LENGTH, None)
        else:
            assert (last.finish, last.stop_reason) == (STOPPED, expected_stop)


def test_eos_ignore_eos_and_min_tokens() -> None:
    assert run(SamplingParams(), ["a", ""], [TEXT_TOKEN, EOS])[-1] == ("", STOPPED, None)
    ignoring = run(SamplingParams(ignore_eos=True, max_tokens=3), ["a", "", "b"],
                   [TEXT_TOKEN, EOS, TEXT_TOKEN])
    assert [d.finish for d in ignoring] == [None, None, LENGTH]
    early = run(SamplingParams(min_tokens=3, stop_token_ids=(7,)), ["a", "", "", "", "z"],
                [EOS, 7, TEXT_TOKEN, EOS, TEXT_TOKEN])
    assert [d.finish for d in early] == [None, None, None, STOPPED]
    assert run(SamplingParams(), ["a"], [EOS], eos=(EOS, 9))[-1].finish == STOPPED
    assert run(SamplingParams(), ["a"], [9], eos=(EOS, 9))[-1].finish == STOPPED


def test_stop_strings_not_matched_in_first_min_tokens() -> None:
    # Stops may trigger from the min_tokens-th token on (vLLM's rule).
    decisions = run(SamplingParams(stop=("X",), min_tokens=3), ["aX", "bX", "cXd"])
    assert [d.emit_text for d in decisions] == ["aX", "bX", "c"]
    assert decisions[-1].finish == STOPPED and decisions[-1].stop_reason == "X"


def test_stop_string_wins_over_stop_token_and_length() -> None:
    params = SamplingParams(stop=("EN",), stop_token_ids=(7,), max_tokens=2)
    decisions = run(params, ["ok ", "END"], [TEXT_TOKEN, 7])
    assert decisions[-1] == ("", STOPPED, "EN") and emitted(decisions) == "ok "


def test_abort_flush_and_use_after_finish() -> None:
    checker = StopChecker(SamplingParams(stop=("STOP",)), (EOS,))
    assert checker.update(TEXT_TOKEN, 1, "x STO").emit_text == "x "
    assert checker.num_held_chars == 3
    assert checker.flush() == "STO" and checker.num_held_chars == 0
    checker.update(EOS, 2, "")
    with pytest.raises(StopCheckerFinishedError):
        checker.update(TEXT_TOKEN, 3, "y")
