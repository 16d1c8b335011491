"""Checks that an engine directory's parts agree with each other, run by the loader before anything is built.

What it is for: `check_build_limits` (the manifest's `build` limits against
each other and against the checkpoint config) and `check_tokenizer` (the
tokenizer files parse, as the `tokenizers` library and Jinja read them, and
every token id they can produce lies inside the checkpoint's vocabulary). Each
refusal is an `EngineLoadError` naming the file and the field, so a corrupt or
hand-edited engine (even with its checksums re-signed) stops the server with
one line instead of a traceback or a silently wrong engine.
Not for: per-tensor checks of the weights (engine_dir / checkpoint_layout) or
loading the tokenizer for use (the runtime does that with transformers).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_format.errors import EngineLoadError
from engine_format.llm_config import SHORT_DTYPES, LLMConfig

if TYPE_CHECKING:
    from engine_format.engine_dir import EngineBuildConfig

MANIFEST = "engine.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def check_build_limits(build: EngineBuildConfig, llm: LLMConfig, config_rel: str) -> None:
    """The build limits are usable together and by this checkpoint."""
    if build.max_input_len > build.max_seq_len:
        raise EngineLoadError(MANIFEST, f"{build.max_input_len} exceeds build.max_seq_len ({build.max_seq_len}): "
                                        "a prompt must leave room for output", "build.max_input_len")
    if build.max_num_tokens < build.tokens_per_block:
        raise EngineLoadError(MANIFEST, f"{build.max_num_tokens} is below build.tokens_per_block "
                                        f"({build.tokens_per_block})", "build.max_num_tokens")
    if build.tokens_per_block & (build.tokens_per_block - 1):
        raise EngineLoadError(MANIFEST, f"{build.tokens_per_block} is not a power of 2", "build.tokens_per_block")
    if build.max_seq_len > llm.max_position_embeddings:
        raise EngineLoadError(MANIFEST, f"{build.max_seq_len} exceeds the checkpoint's max_position_embeddings "
                                        f"({llm.max_position_embeddings}, {config_rel})", "build.max_seq_len")
    if SHORT_DTYPES.get(build.dtype, build.dtype) != llm.dtype:
        raise EngineLoadError(MANIFEST, f"{build.dtype!r} disagrees with {config_rel} dtype {llm.dtype!r}",
                              "build.dtype")


def check_pad_token(pad_token_id: Any, vocab_size: int) -> None:
    if pad_token_id is not None and not (isinstance(pad_token_id, int) and not isinstance(pad_token_id, bool)
                                         and 0 <= pad_token_id < vocab_size):
        raise EngineLoadError(MANIFEST, f"expected null or a token id below vocab_size ({vocab_size}), "
                                        f"got {pad_token_id!r}", "generation.pad_token_id")


def check_tokenizer(tokenizer_dir: Path, rel_dir: str, vocab_size: int) -> None:
    """tokenizer.json is a tokenizer whose ids fit the vocabulary; its config and chat template parse."""
    from tokenizers import Tokenizer

    rel = f"{rel_dir}/{TOKENIZER_FILE}"
    text = _read_text(tokenizer_dir / TOKENIZER_FILE, rel)
    if not isinstance(_parse_json(text, rel), dict):
        raise EngineLoadError(rel, "expected a JSON object")
    try:
        tokenizer = Tokenizer.from_str(text)
    except Exception as exc:  # the Rust parser raises plain Exception with serde's message
        raise EngineLoadError(rel, f"not a tokenizer the tokenizers library can read ({_first_line(exc)})") from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if not vocab:
        raise EngineLoadError(rel, "holds no tokens")
    top = max(vocab.values())
    if top >= vocab_size:
        raise EngineLoadError(rel, f"token id {top} is outside the checkpoint's vocabulary (vocab_size {vocab_size})")
    config_path = tokenizer_dir / TOKENIZER_CONFIG_FILE
    if config_path.exists():
        config_rel = f"{rel_dir}/{TOKENIZER_CONFIG_FILE}"
        if not isinstance(_parse_json(_read_text(config_path, config_rel), config_rel), dict):
            raise EngineLoadError(config_rel, "expected a JSON object")
    template_path = tokenizer_dir / CHAT_TEMPLATE_FILE
    if template_path.exists():
        _check_template(_read_text(template_path, f"{rel_dir}/{CHAT_TEMPLATE_FILE}"), f"{rel_dir}/{CHAT_TEMPLATE_FILE}")


def _check_template(source: str, rel: str) -> None:
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        ImmutableSandboxedEnvironment().parse(source)
    except TemplateSyntaxError as exc:
        raise EngineLoadError(rel, f"not a valid Jinja template (line {exc.lineno}: {exc.message})") from None


def _read_text(path: Path, rel: str) -> str:
    if not path.is_file():
        raise EngineLoadError(rel, "missing")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EngineLoadError(rel, f"not UTF-8 text (byte {exc.start})") from None


def _parse_json(text: str, rel: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise EngineLoadError(rel, f"invalid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [exc.__class__.__name__])[0][:200]
