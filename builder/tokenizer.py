"""The shared offline tokenizer: a byte-level BPE trained on text this machine has.

What it is for: giving every tiny / random-weight preset a real tokenizer (with
Qwen's special tokens and a chat template) without reaching a model hub. The
training corpus is a fixed list of Python standard library sources plus a small
multilingual file shipped in builder/configs/tokenizer; the result is cached under the
corpus hash, and training is deterministic for a given corpus.
Not for: loading a model's own tokenizer (builder/source.py does that).
"""
from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

from builder.presets import CONFIGS_DIR

VOCAB_SIZE = 2048
TOKENIZER_VERSION = 1
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# Modules present, with long-stable content, in Python 3.10 to 3.12.
STDLIB_FILES = (
    "abc.py", "argparse.py", "base64.py", "bisect.py", "calendar.py", "csv.py", "difflib.py",
    "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py", "json/decoder.py",
    "json/encoder.py", "logging/__init__.py", "statistics.py", "string.py", "textwrap.py",
    "threading.py", "typing.py", "collections/__init__.py", "dataclasses.py", "random.py",
)
# Qwen2.5's conventions: ChatML turns, and with `tools` a system turn listing them and asking for
# <tool_call>{"name": ..., "arguments": {...}}</tool_call> replies (the text is this project's own).
# Without tools it renders exactly what it rendered before tools were added. (HF renders
# templates with trim_blocks: a newline right after a block tag is written as {{ '\\n' }}.)
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}{{ '\\n\\n' }}# Tools\n\n"
    "You may call one or more functions. Their signatures are inside <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}{{ '\\n' }}</tools>\n\n"
    "For each call, reply with a JSON object holding the function name and its arguments inside "
    "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{% if not tools and loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% endif %}{% endfor %}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}"
    "<tool_call>\n{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ call['function']['arguments'] | tojson }}}\n</tool_call>{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus_files() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in STDLIB_FILES if (stdlib / name).is_file()]
    return files + [CONFIGS_DIR / "tokenizer" / "extra_corpus.txt"]


def corpus_hash(files: list[Path]) -> str:
    digest = hashlib.sha256(f"v{TOKENIZER_VERSION}:{VOCAB_SIZE}:{CHAT_TEMPLATE}".encode())
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def offline_tokenizer_dir(cache_dir: Path) -> Path:
    """Return a directory holding the trained tokenizer in HF format, training it if needed."""
    files = corpus_files()
    out_dir = cache_dir / "tokenizers" / f"offline-bpe-{corpus_hash(files)}"
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    _train(files).save_pretrained(str(tmp_dir))
    tmp_dir.replace(out_dir) if not out_dir.exists() else None
    return out_dir


def _train(files: list[Path]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in files]
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def special_token_ids(tokenizer_dir: Path) -> dict[str, int]:
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    return {t["content"]: t["id"] for t in data.get("added_tokens", [])}


def extended_tokenizer_dir(cache_dir: Path, special_tokens: tuple[str, ...], chat_template: str) -> Path:
    """The shared offline tokenizer plus `special_tokens` (appended: the shared ids do not move) and a
    family's chat template, made once and cached under a key of the base tokenizer and both values."""
    from transformers import AutoTokenizer

    base = offline_tokenizer_dir(cache_dir)
    key = hashlib.sha256(json.dumps([list(special_tokens), chat_template]).encode()).hexdigest()[:12]
    out_dir = cache_dir / "tokenizers" / f"{base.name}-x{key}"
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)},
                                 replace_extra_special_tokens=False)
    tokenizer.chat_template = chat_template
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    tokenizer.save_pretrained(str(tmp_dir))
    if not out_dir.exists():
        tmp_dir.replace(out_dir)
    return out_dir
