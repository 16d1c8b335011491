"""Batched token sampling with per-request parameters.

What it is for: turning one step's logits `[B, V]` into one token per row, each
row with its own SamplingParams, in a fixed order:

1. logprobs, when asked: `log_softmax` of the RAW model logits (before any
   penalty, ban, temperature or truncation), as vLLM returns them;
2. penalties: repetition (HF semantics: over prompt + output tokens, divide
   positive logits, multiply negative ones), then frequency and presence
   (OpenAI / vLLM semantics: over OUTPUT tokens only, subtracted);
3. bans (set to -inf): while fewer than `min_tokens` tokens were generated, the
   EOS ids (unless `ignore_eos`: then EOS is not a stop, so it is not banned) and
   `stop_token_ids`; bad words (TensorRT-LLM semantics: a one-token word is
   always banned; a longer word bans its last token when the tail of
   prompt + output equals the rest of it); structured output (runtime/structured):
   tokens the request's grammar forbids;
4. greedy rows (`SamplingParams.greedy`: temperature below `GREEDY_TEMPERATURE`): argmax;
   sampled rows: divide by temperature, top-k (0 or > V means V), top-p, min-p,
   softmax, then draw.

Each row is one request's engine record (runtime/core/request.py): the sampler
reads its parameters, prompt and output ids, EOS ids and generator, and writes
nothing back but a cached tensor of the prompt, the output length from which it is plain greedy
(`Request.plain_greedy_from`) and, for structured output, the
sampled token into the request's grammar matcher.
Randomness: a row with a seed draws from its own `torch.Generator`
(`Request.generator`, made at admission and kept across steps), so the same
seed gives the same tokens whatever else is in the batch and wherever the row
sits; rows without a seed share the sampler's generator. Draws use the
exponential race `argmax(p / E)`, E ~ Exp(1), which picks token i with
probability p_i; everything but the draws of seeded rows is vectorised over the
batch.
Not for: deciding when a request stops (runtime/core/stop_checker.py) or validating
parameters (SamplingParams.validate, which the sampler trusts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from runtime.sampling_params import SamplingParams
from runtime.structured.bitmask import accept_tokens, apply_grammar_masks

if TYPE_CHECKING:
    from runtime.core.request import Request


@dataclass(frozen=True, slots=True)
class TokenLogprobs:
    """Log-probability of the sampled token and of the `n` most likely tokens."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token_id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class SamplerOutput:
    sampled_token_ids: list[int]
    logprobs: list[TokenLogprobs | None]        # None where the request did not ask


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request's random stream (`Request.generator`); `seed` in [0, 2**64).

    Make it once per request and keep it: its position is part of the request's stream.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the order."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        # Shared stream for rows without a seed; None means torch's default generator.
        self._generator = generator

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """One token per row of `logits` [B, V] (any float dtype; computed in float32)."""
        if _all_plain_greedy(requests) and logits.shape[0] == len(requests):
            # fast path: nothing changes a logit, so the argmax of the raw logits is the token (float32 holds
            # every lower-precision value exactly: same argmax, no copy)
            return SamplerOutput(argmax_rows(logits), [None] * len(requests))
        logits = _float32_copy(logits, requests)
        raw_logprobs = _raw_logprobs(logits, requests)
        apply_penalties_and_bans(logits, requests)

        token_ids = argmax_rows(logits)
        # Row choices are made from the params on the host: no device syncs.
        sampled_rows = [i for i, s in enumerate(requests) if not s.sampling_params.greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            sub_requests = [requests[i] for i in sampled_rows]
            probs = _processed_probs(logits[rows], [s.sampling_params for s in sub_requests])
            for i, token_id in zip(sampled_rows, self._draw(probs, sub_requests).tolist()):
                token_ids[i] = token_id

        accept_tokens(token_ids, [r.grammar for r in requests])
        return SamplerOutput(token_ids, _collect_logprobs(raw_logprobs, token_ids, requests))

    def _draw(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row of `probs` by exponential race; seeded rows use their own generator."""
        vocab_size = probs.shape[1]
        noise = torch.empty_like(probs)
        unseeded = [i for i, s in enumerate(requests) if s.generator is None]
        if unseeded:
            shared = torch.empty(len(unseeded), vocab_size, device=probs.device)
            shared.exponential_(generator=self._generator_for(probs.device))
            noise[unseeded] = shared
        for i, request in enumerate(requests):
            if request.generator is not None:
                row = torch.empty(vocab_size, device=request.generator.device)
                noise[i] = row.exponential_(generator=request.generator).to(probs.device)
        # Exp(1) can return exactly 0; a floor keeps p / E finite and 0 / E zero.
        noise.clamp_(min=torch.finfo(torch.float32).tiny)
        return (probs / noise).argmax(dim=-1)

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self._generator is not None and self._generator.device.type != device.type:
            raise ValueError(f"sampler generator is on {self._generator.device}, "
                             f"logits are on {device}")
        return self._generator


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """Each row's argmax as host ints: the first largest value, a NaN counting as the largest (torch.argmax's
    rule, and numpy's). A float32 / float64 CPU tensor goes through numpy, whose SIMD argmax measured 10x
    faster than torch's on the 2-core dev machine (one thread, best of 10: [16, 2056] 4 us against 56 us,
    [16, 151936] 2.2 ms against 23 ms)."""
    if logits.is_cpu and logits.dtype in (torch.float32, torch.float64) and logits.ndim == 2:
        return logits.numpy().argmax(axis=1).tolist()
    return logits.argmax(dim=-1).tolist()


def _all_plain_greedy(requests: list[Request]) -> bool:
    """Whether every row is greedy with no logprobs, penalty, ban or grammar this step: steps 1-3 change nothing."""
    for request in requests:
        start = request.plain_greedy_from
        if start is None:
            start = request.plain_greedy_from = _plain_greedy_from(request)
        if start < 0 or len(request.output_token_ids) < start:
            return False
    return True


def _plain_greedy_from(request: Request) -> int:
    """Output tokens from which the request is plain greedy (-1: never): greedy, no logprobs, no penalty, no
    grammar, no bad words (a request with bad words takes the full path, which gives the same token when none
    is banned); min_tokens bans its stop tokens (and EOS unless ignore_eos) until it has that many tokens."""
    params = request.sampling_params
    if not (params.greedy and params.logprobs is None and request.grammar is None
            and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0 and not params.bad_words_ids):
        return -1
    if params.stop_token_ids or (not params.ignore_eos and request.eos_token_ids):
        return params.min_tokens
    return 0


def sampling_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The distribution `Sampler.sample` draws each row from, as float32 [B, V].

    Greedy rows get a one-hot of their argmax. For tests, and for strategies
    (speculative decoding) that need the probabilities rather than a token.
    """
    logits = _float32_copy(logits, requests)
    apply_penalties_and_bans(logits, requests)
    probs = torch.zeros_like(logits).scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    sampled_rows = [i for i, s in enumerate(requests) if not s.sampling_params.greedy]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        probs[rows] = _processed_probs(logits[rows], [requests[i].sampling_params for i in sampled_rows])
    return probs


def apply_penalties_and_bans(logits: torch.Tensor, requests: list[Request]) -> None:
    """Steps 2 and 3 of the module docstring, in place on float32 `logits`."""
    _apply_penalties(logits, requests)
    _apply_bans(logits, requests)
    apply_grammar_masks(logits, [r.grammar for r in requests])


def _float32_copy(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    if logits.dim() != 2 or logits.shape[0] != len(requests):
        raise ValueError(f"logits must be [num_requests={len(requests)}, vocab], "
                         f"got {tuple(logits.shape)}")
    # A copy: the caller's tensor is never modified.
    return logits.to(torch.float32, copy=True)


def _raw_logprobs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor | None:
    """log_softmax of the raw logits for the rows that asked, else None."""
    if all(s.sampling_params.logprobs is None for s in requests):
        return None
    return torch.log_softmax(logits, dim=-1)


def _collect_logprobs(raw_logprobs: torch.Tensor | None, token_ids: list[int],
                      requests: list[Request]) -> list[TokenLogprobs | None]:
    out: list[TokenLogprobs | None] = [None] * len(requests)
    rows = [i for i, s in enumerate(requests) if s.sampling_params.logprobs is not None]
    if raw_logprobs is None or not rows:
        return out
    device = raw_logprobs.device
    chosen = raw_logprobs[torch.tensor(rows, device=device),
                          torch.tensor([token_ids[i] for i in rows], device=device)].tolist()
    # One top-k for all rows at the largest n asked for; each row keeps its own n.
    num_top = min(max(requests[i].sampling_params.logprobs or 0 for i in rows), raw_logprobs.shape[1])
    top_values: list[list[float]] = [[] for _ in rows]
    top_ids: list[list[int]] = [[] for _ in rows]
    if num_top > 0:
        values, ids = raw_logprobs[torch.tensor(rows, device=device)].topk(num_top, dim=-1)
        top_values, top_ids = values.tolist(), ids.tolist()
    for j, i in enumerate(rows):
        num = requests[i].sampling_params.logprobs or 0
        top = tuple(zip(top_ids[j][:num], top_values[j][:num]))
        out[i] = TokenLogprobs(token_ids[i], chosen[j], top)
    return out


def _apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """Repetition penalty over prompt + output, then frequency / presence over output.

    In place, touching only the rows that have the penalty.
    """
    device = logits.device
    rep_rows = [i for i, s in enumerate(requests) if s.sampling_params.repetition_penalty != 1.0]
    if rep_rows:
        token_ids = [torch.cat((_prompt_ids_tensor(requests[i]),
                                _ids_tensor(requests[i].output_token_ids))) for i in rep_rows]
        index = torch.tensor(rep_rows, device=device)
        sub = logits[index]
        seen = torch.zeros_like(sub, dtype=torch.bool)
        seen[_row_col_index(token_ids, device)] = True
        penalty = _column([requests[i].sampling_params.repetition_penalty for i in rep_rows], device)
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits[index] = torch.where(seen, penalised, sub)

    count_rows = [i for i, s in enumerate(requests)
                  if (s.sampling_params.frequency_penalty != 0.0
                      or s.sampling_params.presence_penalty != 0.0)
                  and s.output_token_ids]
    if count_rows:
        index = torch.tensor(count_rows, device=device)
        counts = torch.zeros(len(count_rows), logits.shape[1], device=device)
        rows, cols = _row_col_index(
            [_ids_tensor(requests[i].output_token_ids) for i in count_rows], device)
        counts.index_put_((rows, cols), torch.ones_like(rows, dtype=counts.dtype),
                          accumulate=True)
        frequency = _column([requests[i].sampling_params.frequency_penalty for i in count_rows], device)
        presence = _column([requests[i].sampling_params.presence_penalty for i in count_rows], device)
        logits[index] -= frequency * counts + presence * (counts > 0).to(counts.dtype)


def _prompt_ids_tensor(request: Request) -> torch.Tensor:
    """The prompt ids as an int64 CPU tensor, built once per request (prompts do not change)."""
    if request.prompt_ids_tensor is None:
        request.prompt_ids_tensor = torch.tensor(request.prompt_token_ids, dtype=torch.long)
    return request.prompt_ids_tensor


def _ids_tensor(token_ids: list[int]) -> torch.Tensor:
    return torch.tensor(token_ids, dtype=torch.long)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _row_col_index(token_ids: list[torch.Tensor],
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (row, column) indices: row j of a sub-batch paired with each of token_ids[j]."""
    rows = torch.cat([torch.full((len(ids),), j, dtype=torch.long)
                      for j, ids in enumerate(token_ids)])
    return rows.to(device), torch.cat(token_ids).to(device)


def _apply_bans(logits: torch.Tensor, requests: list[Request]) -> None:
    """min_tokens and bad-words bans: the banned tokens' logits become -inf, in place."""
    rows: list[int] = []
    cols: list[int] = []
    for i, request in enumerate(requests):
        banned = _banned_token_ids(request)
        rows.extend([i] * len(banned))
        cols.extend(banned)
    if rows:
        logits[torch.tensor(rows, device=logits.device),
               torch.tensor(cols, device=logits.device)] = float("-inf")


def _banned_token_ids(request: Request) -> list[int]:
    params = request.sampling_params
    banned: list[int] = []
    if len(request.output_token_ids) < params.min_tokens:
        banned.extend(params.stop_token_ids)
        if not params.ignore_eos:
            banned.extend(request.eos_token_ids)
    for word in params.bad_words_ids:
        prefix = word[:-1]
        if _tail_equals(request.prompt_token_ids, request.output_token_ids, prefix):
            banned.append(word[-1])
    return banned


def _tail_equals(prompt_ids: list[int], output_ids: list[int],
                 expected: Sequence[int]) -> bool:
    """Whether prompt_ids + output_ids ends with `expected`, without concatenating them."""
    num_expected = len(expected)
    if num_expected == 0:
        return True
    if num_expected > len(prompt_ids) + len(output_ids):
        return False
    num_from_output = min(num_expected, len(output_ids))
    num_from_prompt = num_expected - num_from_output
    tail = output_ids[len(output_ids) - num_from_output:]
    if num_from_prompt:
        tail = prompt_ids[len(prompt_ids) - num_from_prompt:] + tail
    return tuple(tail) == tuple(expected)


def _processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p, min-p, softmax for sampled (non-greedy) rows."""
    device = logits.device
    vocab_size = logits.shape[1]
    logits = logits / _column([p.temperature for p in params], device)

    # top_k 0 means off, and a top_k above the vocabulary is clamped to it.
    top_k = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
    truncate = [j for j, p in enumerate(params) if top_k[j] < vocab_size or p.top_p < 1.0]
    if truncate:
        index = torch.tensor(truncate, device=device)
        logits[index] = _top_k_top_p(
            logits[index], torch.tensor([top_k[j] for j in truncate], device=device),
            torch.tensor([params[j].top_p for j in truncate], device=device))

    if any(p.min_p > 0 for p in params):
        probs = torch.softmax(logits, dim=-1)
        threshold = _column([p.min_p for p in params], device) * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the top_k largest logits (ties at the k-th kept, as HF does), then the
    smallest most-likely set whose probability reaches top_p (at least one token)."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    kth = sorted_logits.gather(1, (top_k - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))

    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A token goes when the more likely tokens already reach top_p; top_p 1 keeps
    # everything (cumulative rounding may pass 1.0).
    limit = torch.where(top_p >= 1.0, torch.full_like(top_p, float("inf")), top_p.float())
    drop = mass_before >= limit.unsqueeze(1)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
