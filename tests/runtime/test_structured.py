"""Structured output without an engine: grammars compiled for the offline tokenizer, masks applied to random
logits of a whole batch, and every sampled text checked against its language (jsonschema for schemas,
re.fullmatch for regexes, a hand-written parser for the grammar); unsupported constructs are refused by name."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from builder.tokenizer import EOS_TOKEN, offline_tokenizer_dir
from runtime.sampling_params import GuidedDecoding, SamplingParams, SamplingParamsError
from runtime.structured.bitmask import accept_tokens, apply_grammar_masks
from runtime.structured.grammars import GrammarCache
from runtime.structured.schema_check import StructuredOutputError

VOCAB_SIZE = 2056               # the tiny presets' embedding rows (2048 BPE + 8 special tokens)
NUM_SAMPLES = 8                 # rows sampled together per guide (the served tests send 20 per kind)
MAX_STEPS = 200
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "score": {"type": "number", "minimum": 0, "maximum": 1},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 3},
    "active": {"type": "boolean"},
    "manager": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/ref"}]},
}, "required": ["name", "age", "role"], "additionalProperties": False,
    "$defs": {"ref": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}},
                      "required": ["id"]}}}
MORE_KEYWORDS = {"type": "object", "properties": {
    "pair": {"type": "array", "prefixItems": [{"const": "a"}, {"type": "integer"}], "minItems": 2, "maxItems": 3,
             "items": {"type": "boolean"}},
    "x": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 9},
    "m": {"type": "integer", "multipleOf": 7, "minimum": 0, "maximum": 100},
    "f": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "s": {"type": "string", "minLength": 2, "maxLength": 4},
    "d": {"$ref": "#/definitions/d"},
    "n": {"type": ["integer", "null"], "minimum": 0, "maximum": 5},
}, "required": ["pair", "x", "m", "f", "s", "d", "n"], "definitions": {"d": {"enum": [1, 2]}}}
EMAIL = r"[a-z]{1,8}@[a-z]{2,6}\.(com|org)"
SUM_GRAMMAR = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num)*\nnum ::= [1-9] [0-9]{0,3}'


@pytest.fixture(scope="module")
def grammars(cache_dir: Path) -> GrammarCache:
    tokenizer = AutoTokenizer.from_pretrained(str(offline_tokenizer_dir(cache_dir)))
    return GrammarCache(tokenizer, VOCAB_SIZE, [tokenizer.convert_tokens_to_ids(EOS_TOKEN)])


def sample_texts(grammars: GrammarCache, guide: GuidedDecoding, seed: int = 0) -> list[str]:
    """NUM_SAMPLES rows sampled together from random logits under the guide's mask, until each ends."""
    tokenizer, eos = grammars._tokenizer, grammars.stop_token_ids[0]
    states = [grammars.matcher(guide) for _ in range(NUM_SAMPLES)]
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in states]
    done = [False] * NUM_SAMPLES
    for _ in range(MAX_STEPS):
        logits = torch.randn(NUM_SAMPLES, VOCAB_SIZE, generator=generator)
        apply_grammar_masks(logits, [None if d else s for d, s in zip(done, states)])
        tokens = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1).tolist()
        accept_tokens(tokens, [None if d else s for d, s in zip(done, states)])
        for i, token in enumerate(tokens):
            if not done[i]:
                done[i] = token == eos
                if not done[i]:
                    outputs[i].append(token)
        if all(done):
            return [tokenizer.decode(ids) for ids in outputs]
    raise AssertionError(f"{done.count(False)} samples did not finish within {MAX_STEPS} steps")


def test_json_schema_samples_validate(grammars: GrammarCache) -> None:
    for schema in (PERSON, MORE_KEYWORDS):        # every allowed keyword but format (test_string_formats_parse)
        for text in sample_texts(grammars, GuidedDecoding("json_schema", json.dumps(schema))):
            jsonschema.validate(json.loads(text), schema)


def test_prefix_and_suffix_wrap_the_language(grammars: GrammarCache) -> None:
    guide = GuidedDecoding("json_schema", json.dumps(PERSON), "<tool_call>\n", "\n</tool_call>")
    for text in sample_texts(grammars, guide, seed=1):
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        jsonschema.validate(json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")]), PERSON)


def test_regex_and_ebnf_samples_match(grammars: GrammarCache) -> None:
    for text in sample_texts(grammars, GuidedDecoding("regex", EMAIL), seed=2):
        assert re.fullmatch(EMAIL, text), text
    for text in sample_texts(grammars, GuidedDecoding("ebnf", SUM_GRAMMAR), seed=3):
        assert re.fullmatch(r"\([1-9][0-9]{0,3}([+*][1-9][0-9]{0,3})*\)", text), text


def test_json_object_is_compact_valid_json(grammars: GrammarCache) -> None:
    """Any object, but no free whitespace and no raw control characters (json.loads is strict)."""
    guide = GuidedDecoding("json_object")
    states = [grammars.matcher(guide) for _ in range(4)]
    for state in states:
        assert state.matcher.accept_string('{"a": [1, "x\\n"], "b": {}}')
        assert not state.matcher.accept_string("\n")
    bounded = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 4}}, "required": ["s"]}
    matcher = grammars.matcher(GuidedDecoding("json_schema", json.dumps(bounded))).matcher
    assert matcher.accept_string('{"s": "')
    assert not matcher.accept_string("\x01")        # xgrammar 0.2.8 alone would take it


def test_string_formats_parse(grammars: GrammarCache) -> None:
    import datetime
    import ipaddress
    import uuid

    parsers = {"date": datetime.date.fromisoformat, "uuid": uuid.UUID, "ipv6": ipaddress.IPv6Address,
               "date-time": lambda s: datetime.datetime.fromisoformat(s.replace("Z", "+00:00")),
               "time": lambda s: datetime.time.fromisoformat(s.replace("Z", "+00:00"))}
    schema = {"type": "object", "properties": {name: {"type": "string", "format": name} for name in parsers},
              "required": list(parsers), "additionalProperties": False}
    for text in sample_texts(grammars, GuidedDecoding("json_schema", json.dumps(schema)), seed=4):
        for name, value in json.loads(text).items():
            parsers[name](value)


def test_compiled_grammars_are_cached(grammars: GrammarCache) -> None:
    guide = GuidedDecoding("regex", "[0-9]{3}")
    first = grammars.compile(guide)
    count = grammars.num_compiled
    assert grammars.compile(GuidedDecoding("regex", "[0-9]{3}")) is first and grammars.num_compiled == count


@pytest.mark.parametrize(("schema", "construct"), [
    ({"type": "object", "not": {"type": "null"}}, "'not'"),
    ({"type": "string", "format": "credit-card"}, "format: credit-card"),
    ({"type": "string", "format": "ipv4"}, "format: ipv4"),          # xgrammar 0.2.8 allows leading zeros
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "'oneOf'"),
    ({"type": "object", "properties": {"x": {"type": "array", "uniqueItems": True}}}, "'uniqueItems' at #/properties/x"),
    ({"$ref": "http://example.com/schema.json"}, "$ref"),
    ({"type": "date"}, "unsupported type"),
])
def test_unsupported_schema_constructs_are_named(grammars: GrammarCache, schema: dict, construct: str) -> None:
    with pytest.raises(StructuredOutputError) as info:
        grammars.compile(GuidedDecoding("json_schema", json.dumps(schema)))
    assert info.value.field == "guided_decoding.spec" and construct in str(info.value), str(info.value)


def test_bad_guides_are_refused(grammars: GrammarCache) -> None:
    for guide, words in ((GuidedDecoding("json_schema", "{not json"), "not valid JSON"),
                         (GuidedDecoding("regex", "(unclosed"), "does not compile"),
                         (GuidedDecoding("ebnf", "root ::= missing_rule"), "does not compile")):
        with pytest.raises(StructuredOutputError, match=words):
            grammars.compile(guide)
    with pytest.raises(SamplingParamsError, match="guided_decoding.kind"):
        SamplingParams(guided_decoding=GuidedDecoding("yaml", "x")).validate()
    with pytest.raises(SamplingParamsError, match="guided_decoding.spec"):
        SamplingParams(guided_decoding=GuidedDecoding("regex", "")).validate()
