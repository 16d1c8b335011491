"""Sampler: processed distributions against a float64 per-row reference, greedy,
seeded reproducibility, bans, clamping and logprobs.

Tolerance: float32 sampler vs float64 reference, probabilities within 2e-6.
"""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from runtime.core.request import Request
from runtime.executor.sampler import Sampler, TokenLogprobs, argmax_rows, make_generator, sampling_probs
from runtime.sampling_params import SamplingParams

VOCAB = 64
EOS = 3


def state(params: SamplingParams, prompt: list[int] | None = None,
          output: list[int] | None = None, eos: tuple[int, ...] = (EOS,)) -> Request:
    """A request record as the engine admits it (a seeded one with its own generator)."""
    return Request("r", prompt or [1, 2], params, eos_token_ids=eos, output_token_ids=output or [],
                   generator=None if params.seed is None else make_generator(params.seed))


def reference_probs(logits: torch.Tensor, st: Request) -> torch.Tensor:
    """Independent float64 per-row implementation of the documented order."""
    p = st.sampling_params
    x = [float(v) for v in logits.double()]
    for t in set(st.prompt_token_ids + st.output_token_ids):
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, n in Counter(st.output_token_ids).items():
        x[t] -= p.frequency_penalty * n + p.presence_penalty
    banned = set()
    if len(st.output_token_ids) < p.min_tokens:
        banned |= set(p.stop_token_ids) | (set() if p.ignore_eos else set(st.eos_token_ids))
    seq = st.prompt_token_ids + st.output_token_ids
    for word in p.bad_words_ids:
        if len(word) == 1 or (len(seq) >= len(word) - 1 and
                              tuple(seq[len(seq) - len(word) + 1:]) == word[:-1]):
            banned.add(word[-1])
    for t in banned:
        x[t] = -math.inf
    if p.greedy:
        out = [0.0] * len(x)
        out[max(range(len(x)), key=lambda i: x[i])] = 1.0
        return torch.tensor(out, dtype=torch.float64)
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:p.top_k] if 0 < p.top_k < len(x) else order)

    def softmax(kept: set[int]) -> dict[int, float]:
        m = max(x[i] for i in kept)
        e = {i: math.exp(x[i] - m) for i in kept if x[i] > -math.inf}
        s = sum(e.values())
        return {i: v / s for i, v in e.items()}

    if p.top_p < 1.0:
        pr, cum, nucleus = softmax(keep), 0.0, set()
        for i in order:
            if i not in pr:
                continue
            if cum >= p.top_p:
                break
            nucleus.add(i)
            cum += pr[i]
        keep = nucleus
    pr = softmax(keep)
    if p.min_p > 0:
        top = max(pr.values())
        pr = softmax({i for i, v in pr.items() if v >= p.min_p * top})
    return torch.tensor([pr.get(i, 0.0) for i in range(len(x))], dtype=torch.float64)


PARAM_CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.05),
    SamplingParams(temperature=1.0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, repetition_penalty=0.8, presence_penalty=0.5,
                   frequency_penalty=-0.3),
    SamplingParams(temperature=1.0, frequency_penalty=1.5, top_k=10),
    SamplingParams(temperature=0.0, repetition_penalty=1.5, presence_penalty=1.0),
    SamplingParams(temperature=1.0, top_k=10**6, min_tokens=4, stop_token_ids=(7,)),
    SamplingParams(temperature=1.0, bad_words_ids=((9,), (5, 6, 11), (2, 12))),
]


def batch_states() -> list[Request]:
    gen = torch.Generator().manual_seed(7)
    states = []
    for i, params in enumerate(PARAM_CASES):
        prompt = torch.randint(0, VOCAB, (5 + i,), generator=gen).tolist()
        output = torch.randint(0, VOCAB, (i % 4,), generator=gen).tolist() + [5, 6]
        states.append(state(params, prompt, output))
    return states


def test_processed_distribution_matches_float64_reference() -> None:
    states = batch_states()
    logits = torch.randn(len(states), VOCAB, generator=torch.Generator().manual_seed(1)) * 3
    probs = sampling_probs(logits, states)
    for i, st in enumerate(states):
        ref = reference_probs(logits[i], st)
        torch.testing.assert_close(probs[i].double(), ref, atol=2e-6, rtol=0,
                                   msg=lambda m, i=i: f"row {i} ({states[i].sampling_params}): {m}")


def test_samples_only_from_support_and_input_untouched() -> None:
    states = batch_states()
    logits = torch.randn(len(states), VOCAB, generator=torch.Generator().manual_seed(2))
    before = logits.clone()
    probs = sampling_probs(logits, states)
    for _ in range(20):
        out = Sampler().sample(logits, states)
        for i, token in enumerate(out.sampled_token_ids):
            assert probs[i, token] > 0, (i, token)
    assert torch.equal(logits, before)


def test_empirical_frequencies_match_probs() -> None:
    num_rows = 20000
    params = SamplingParams(temperature=0.8, top_k=6)
    logits = torch.randn(1, 8, generator=torch.Generator().manual_seed(3)).expand(num_rows, 8)
    states = [state(params) for _ in range(num_rows)]
    tokens = Sampler(torch.Generator().manual_seed(4)).sample(logits, states).sampled_token_ids
    freq = torch.bincount(torch.tensor(tokens), minlength=8).double() / num_rows
    expected = sampling_probs(logits[:1], states[:1])[0].double()
    # 5 standard errors of a binomial proportion at n = 20000 is at most 0.018.
    torch.testing.assert_close(freq, expected, atol=0.018, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype: torch.dtype) -> None:
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(5)).to(dtype)
    states = [state(SamplingParams(temperature=t)) for t in (0.0, 0.0, 1e-30, 0.0, 1e-7, 0.0)]
    out = Sampler().sample(logits, states)
    assert out.sampled_token_ids == logits.float().argmax(dim=-1).tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_argmax_rows_follows_torch_argmax_on_ties_nan_and_inf(dtype: torch.dtype) -> None:
    """The numpy path (float32 / float64 on CPU) and torch's agree: first maximum on ties, NaN counts as the
    largest, a row of -inf gives 0; strided rows too."""
    inf, nan = float("inf"), float("nan")
    rows = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2))
    rows[1, 7] = rows[1, 30] = 100.0                     # tie: the first
    rows[2, 11] = nan
    rows[2, 12] = inf
    rows[3] = -inf
    rows[4, 5] = rows[4, 9] = inf
    logits = rows.to(dtype)
    assert argmax_rows(logits) == logits.argmax(dim=-1).tolist()
    assert argmax_rows(logits[:, 3:]) == logits[:, 3:].argmax(dim=-1).tolist()


def test_plain_greedy_fast_path_equals_the_full_path() -> None:
    """An all-greedy batch with nothing to apply skips the float32 copy and the masks; adding one row that
    has something to apply (a min_tokens ban on the argmax) sends the whole batch through the full path."""
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(9))
    logits[:, EOS] = 50.0                               # EOS is every row's argmax
    plain = [state(SamplingParams(temperature=0.0)) for _ in range(4)]
    assert Sampler().sample(logits, plain).sampled_token_ids == [EOS] * 4
    assert Sampler().sample(logits, plain).sampled_token_ids == sampling_probs(logits, plain).argmax(-1).tolist()
    mixed = plain[:3] + [state(SamplingParams(temperature=0.0, min_tokens=2))]
    out = Sampler().sample(logits, mixed).sampled_token_ids
    assert out[:3] == [EOS] * 3 and out[3] != EOS and out[3] == sampling_probs(logits, mixed)[3].argmax().item()
    # one record as it grows (the sampler keeps, per record, from which output length it is plain greedy)
    growing, sampler = mixed[3], Sampler()
    for num_output in range(4):
        token = sampler.sample(logits, plain[:3] + [growing]).sampled_token_ids[3]
        assert (token == EOS) == (num_output >= 2)
        growing.append_output_token(token)


def run_steps(sampler: Sampler, batch: list[Request], index: int,
              num_steps: int, seed: int) -> list[int]:
    tokens = []
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_steps):
        logits = torch.randn(len(batch), VOCAB, generator=gen)
        logits[index] = torch.linspace(-1, 1, VOCAB)   # same logits for the seeded row
        token = sampler.sample(logits, batch).sampled_token_ids[index]
        batch[index].output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_seeded_row_reproduces_across_batches_and_positions() -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    others = [SamplingParams(temperature=0.5), SamplingParams(temperature=1.2, top_k=3),
              SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=99)]
    alone = run_steps(Sampler(), [state(seeded)], 0, 12, seed=10)
    batch_a = [state(seeded)] + [state(p) for p in others]
    batch_b = [state(p) for p in others[::-1]] + [state(seeded)]
    in_a = run_steps(Sampler(torch.Generator().manual_seed(1)), batch_a, 0, 12, seed=20)
    in_b = run_steps(Sampler(torch.Generator().manual_seed(2)), batch_b, 4, 12, seed=30)
    assert alone == in_a == in_b
    assert len(set(alone)) > 1          # really sampled, not constant
    other_seed = run_steps(Sampler(), [state(SamplingParams(temperature=1.0, top_p=0.95,
                                                           seed=1235))], 0, 12, seed=10)
    assert other_seed != alone


def test_make_generator_starts_the_seeds_stream() -> None:
    expected = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(3, generator=make_generator(5)), torch.rand(3, generator=expected))


def test_penalties_see_the_records_tokens_as_they_grow() -> None:
    params = SamplingParams(temperature=0.0, repetition_penalty=100.0)
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11], logits[0, 12] = 3.0, 2.0, 1.0
    request = state(params, prompt=[10])
    assert Sampler().sample(logits, [request]).sampled_token_ids == [11]   # 10 is in the prompt
    request.append_output_token(11)
    assert Sampler().sample(logits, [request]).sampled_token_ids == [12]   # and now 11 was generated


def test_min_tokens_bans_eos_and_stop_tokens() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, EOS], logits[0, 7], logits[0, 8] = 30.0, 20.0, 10.0
    params = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(7,))
    assert Sampler().sample(logits, [state(params, output=[1])]).sampled_token_ids == [8]
    assert Sampler().sample(logits, [state(params, output=[1, 1])]).sampled_token_ids == [EOS]
    # ignore_eos: EOS is not a stop, so min_tokens does not ban it.
    ignore = SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True, stop_token_ids=(7,))
    assert Sampler().sample(logits, [state(ignore)]).sampled_token_ids == [EOS]
    sampled = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=(7,))
    for _ in range(50):
        assert Sampler().sample(logits, [state(sampled)]).sampled_token_ids[0] not in (EOS, 7)


def test_bad_words() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 10], logits[0, 11], logits[0, 12] = 30.0, 20.0, 10.0
    params = SamplingParams(temperature=0.0, bad_words_ids=((10,), (5, 6, 11)))

    def pick(prompt: list[int], output: list[int]) -> int:
        return Sampler().sample(logits, [state(params, prompt, output)]).sampled_token_ids[0]

    assert pick([1], [2]) == 11                 # single-token word always banned
    assert pick([1], [5, 6]) == 12              # tail 5, 6 bans 11
    assert pick([1, 5], [6]) == 12              # tail spans prompt and output
    assert pick([5, 6], []) == 12               # tail in the prompt only
    assert pick([5], [6, 1]) == 11              # tail differs: 11 allowed
    as_lists = SamplingParams(temperature=0.0,
                              bad_words_ids=([5, 6, 10],))  # type: ignore[arg-type]
    assert Sampler().sample(logits, [state(as_lists, [5], [6])]).sampled_token_ids == [11]


def test_top_k_larger_than_vocab_is_clamped() -> None:
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(6))
    big = [state(SamplingParams(top_k=10**9)), state(SamplingParams(top_k=VOCAB))]
    off = [state(SamplingParams(top_k=0)), state(SamplingParams(top_k=0))]
    torch.testing.assert_close(sampling_probs(logits, big), sampling_probs(logits, off))
    Sampler().sample(logits, big)


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(8)) * 2
    states = [state(SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=2.0),
                    output=[0, 1]),
              state(SamplingParams(temperature=0.7, top_k=4, logprobs=0)),
              state(SamplingParams(temperature=1.0)),
              state(SamplingParams(temperature=1.0, logprobs=2, min_tokens=3))]
    out = Sampler().sample(logits, states)
    expected = torch.log_softmax(logits.double(), dim=-1)
    first, second = out.logprobs[0], out.logprobs[1]
    assert isinstance(first, TokenLogprobs) and isinstance(second, TokenLogprobs)
    assert out.logprobs[2] is None
    assert first.token_id == out.sampled_token_ids[0]
    assert first.logprob == pytest.approx(float(expected[0, first.token_id]), abs=1e-5)
    top_ids = expected[0].argsort(descending=True)[:5].tolist()
    assert [t for t, _ in first.top] == top_ids
    for token_id, value in first.top:
        assert value == pytest.approx(float(expected[0, token_id]), abs=1e-5)
    assert second.top == ()
    assert second.logprob == pytest.approx(float(expected[1, second.token_id]), abs=1e-5)
    fourth = out.logprobs[3]
    assert fourth is not None and [t for t, _ in fourth.top] == \
        expected[3].argsort(descending=True)[:2].tolist()


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="num_requests=2"):
        Sampler().sample(torch.zeros(3, VOCAB), [state(SamplingParams())] * 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    states = batch_states()
    logits = torch.randn(len(states), VOCAB, generator=torch.Generator().manual_seed(9)) * 3
    torch.testing.assert_close(sampling_probs(logits.cuda(), states).cpu(),
                               sampling_probs(logits, states), atol=1e-5, rtol=0)
    seeded = SamplingParams(temperature=1.0, seed=7)
    cuda_state = Request("c", [1], seeded, generator=make_generator(7, "cuda"))
    out = Sampler(torch.Generator("cuda").manual_seed(0)).sample(
        logits.cuda().half(), states + [cuda_state, state(seeded)])
    assert len(out.sampled_token_ids) == len(states) + 2
