"""Compiling a request's `GuidedDecoding` into an xgrammar grammar for one engine's tokenizer, cached.

What it is for: `GrammarCache(tokenizer, vocab_size, stop_token_ids)`, one per
engine. `compile(guide)` returns the `CompiledGrammar` (from the cache when the
same guide was compiled before; thread-safe, so the network face compiles on
a worker thread before admission and the engine thread only finds it) or
raises `StructuredOutputError` naming what is wrong. `matcher(guide)` gives a
fresh per-request `GrammarState`.

JSON kinds compile to a compact grammar (", " and ": " separators, no free
whitespace: a model cannot then pad forever), json_object being the schema
`{"type": "object"}`. xgrammar 0.2.8 lets raw control characters into strings
with a maxLength (its rule `[^"\\\\\\r\\n]`), which is not valid JSON; the
converted grammar's class is narrowed to exclude U+0000-U+001F before it is
compiled. A guide's prefix / suffix are literal text around its language.
Not for: masking logits (bitmask.py) or the JSON-schema allow-list (schema_check.py).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from runtime.sampling_params import GuidedDecoding
from runtime.structured.bitmask import GrammarState
from runtime.structured.schema_check import FIELD, StructuredOutputError, check_schema

MAX_CACHED_GRAMMARS = 256
_LOOSE_STRING_CLASS = r'[^\"\\\r\n]'           # xgrammar 0.2.8's character class for length-bounded strings
_JSON_STRING_CLASS = r'[^\0-\x1f\"\\\r\n]'


class GrammarCache:
    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[GuidedDecoding, Any] = OrderedDict()
        self.num_compiled = 0                     # compilations done (cache misses), for tests and stats

    def compile(self, guide: GuidedDecoding) -> Any:
        with self._lock:
            cached = self._cache.get(guide)
            if cached is not None:
                self._cache.move_to_end(guide)
                return cached
            compiler = self._ensure_compiler()
        compiled = self._compile(compiler, guide)
        with self._lock:
            self._cache[guide] = compiled
            self.num_compiled += 1
            while len(self._cache) > MAX_CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return compiled

    def is_cached(self, guide: GuidedDecoding) -> bool:
        with self._lock:
            return guide in self._cache

    def matcher(self, guide: GuidedDecoding) -> GrammarState:
        import xgrammar

        return GrammarState(xgrammar.GrammarMatcher(self.compile(guide)), self.vocab_size)

    def _ensure_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar

            info = xgrammar.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))
            self._compiler = xgrammar.GrammarCompiler(info, max_threads=2)
        return self._compiler

    def _compile(self, compiler: Any, guide: GuidedDecoding) -> Any:
        import xgrammar

        try:
            body = _grammar(guide)
            if guide.prefix or guide.suffix:
                parts = [_literal(guide.prefix)] if guide.prefix else []
                parts.append(body)
                parts += [_literal(guide.suffix)] if guide.suffix else []
                body = xgrammar.Grammar.concat(*parts)
            return compiler.compile_grammar(body)
        except StructuredOutputError:
            raise
        except (RuntimeError, ValueError, TypeError) as exc:   # xgrammar's parse / conversion errors
            message = str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else type(exc).__name__
            raise StructuredOutputError(FIELD, f"the {guide.kind} does not compile: {message}") from None


def _grammar(guide: GuidedDecoding) -> Any:
    import xgrammar

    if guide.kind == "regex":
        return xgrammar.Grammar.from_regex(guide.spec)
    if guide.kind == "ebnf":
        return xgrammar.Grammar.from_ebnf(guide.spec)
    if guide.kind == "json_object":
        schema: object = {"type": "object"}
    else:
        try:
            schema = json.loads(guide.spec)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(FIELD, f"the JSON schema is not valid JSON ({exc.msg} at {exc.pos})") \
                from None
    check_schema(schema)
    converted = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False, strict_mode=True)
    return xgrammar.Grammar.from_ebnf(str(converted).replace(_LOOSE_STRING_CLASS, _JSON_STRING_CLASS))


def _literal(text: str) -> Any:
    import xgrammar

    return xgrammar.Grammar.from_ebnf(f"root ::= {json.dumps(text)}")
