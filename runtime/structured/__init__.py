"""Structured output: grammars compiled with xgrammar, one matcher per request, a token bitmask per step.

schema_check.py refuses JSON-schema constructs that would not be enforced;
grammars.py compiles (and caches) a request's `GuidedDecoding` for one
tokenizer; bitmask.py keeps each request's matcher and masks the batched
logits in the sampler.
"""
