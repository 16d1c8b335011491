"""A corrupt engine directory fails to load with an error naming the file and the field."""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_format.engine_dir import MANIFEST, load_engine, write_manifest
from engine_format.errors import EngineLoadError

WEIGHTS = "llm/rank0.safetensors"
CONFIG = "llm/config.json"


@pytest.fixture()
def engine_copy(build_tiny, tmp_path: Path) -> Path:
    dst = tmp_path / "engine"
    shutil.copytree(build_tiny("tiny-qwen2"), dst)
    return dst


def manifest(root: Path) -> dict:
    return json.loads((root / MANIFEST).read_text())


def resign(root: Path, edit: Callable[[dict], None] | None = None) -> None:
    """Recompute checksums (so the structural guard, not the checksum, is what fires)."""
    data = manifest(root)
    if edit:
        edit(data)
    write_manifest(root, data)


def expect_error(root: Path, file: str, *fragments: str) -> EngineLoadError:
    with pytest.raises(EngineLoadError) as info:
        load_engine(root)
    message = str(info.value)
    assert info.value.file == file or message.startswith(file), message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_intact_engine_loads(engine_copy: Path) -> None:
    engine = load_engine(engine_copy)
    assert engine.llm_config.architecture == "Qwen2ForCausalLM"
    assert len(engine.weights) > 0


def test_bad_manifest_json(engine_copy: Path) -> None:
    (engine_copy / MANIFEST).write_text('{"format_version": 1,')
    expect_error(engine_copy, MANIFEST, "invalid JSON")


@pytest.mark.parametrize("key", ["build", "components", "generation", "files", "format_version"])
def test_manifest_missing_key(engine_copy: Path, key: str) -> None:
    data = manifest(engine_copy)
    del data[key]
    (engine_copy / MANIFEST).write_text(json.dumps(data))
    assert expect_error(engine_copy, MANIFEST, "missing key").field == key


def test_build_missing_key(engine_copy: Path) -> None:
    resign(engine_copy, lambda d: d["build"].pop("max_seq_len"))
    assert expect_error(engine_copy, MANIFEST).field == "build.max_seq_len"


def test_unknown_format_version(engine_copy: Path) -> None:
    data = manifest(engine_copy)
    data["format_version"] = 99
    (engine_copy / MANIFEST).write_text(json.dumps(data))
    assert expect_error(engine_copy, MANIFEST, "99", "rebuild").field == "format_version"


def test_checksum_mismatch(engine_copy: Path) -> None:
    path = engine_copy / WEIGHTS
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    expect_error(engine_copy, WEIGHTS, "checksum mismatch")


def test_truncated_safetensors(engine_copy: Path) -> None:
    path = engine_copy / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    resign(engine_copy)
    expect_error(engine_copy, WEIGHTS, "truncated")


def test_aliased_safetensors(engine_copy: Path) -> None:
    """Two tensors whose data offsets overlap (same bytes read twice)."""
    path = engine_copy / WEIGHTS
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    a, b = sorted(names, key=lambda k: header[k]["data_offsets"][0])[:2]
    size_b = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size_b]
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])
    resign(engine_copy)
    expect_error(engine_copy, WEIGHTS, "overlap")


def _rewrite_weights(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(root / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(root / WEIGHTS))
    resign(root)


def test_tensor_shape_disagrees_with_config(engine_copy: Path) -> None:
    name = "transformer.layers.1.mlp.fc.weight"
    _rewrite_weights(engine_copy, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    assert expect_error(engine_copy, WEIGHTS, "disagrees with llm/config.json").field == name


def test_config_shape_disagrees_with_tensors(engine_copy: Path) -> None:
    cfg = json.loads((engine_copy / CONFIG).read_text())
    cfg["intermediate_size"] += 1
    (engine_copy / CONFIG).write_text(json.dumps(cfg))
    resign(engine_copy)
    assert expect_error(engine_copy, WEIGHTS, "shape").field.endswith("mlp.fc.weight")


def test_missing_and_unexpected_tensor(engine_copy: Path) -> None:
    name = "transformer.layers.0.attention.dense.weight"
    _rewrite_weights(engine_copy, lambda t: t.pop(name))
    assert expect_error(engine_copy, WEIGHTS, "missing tensor").field == name
    _rewrite_weights(engine_copy, lambda t: t.update({name: torch.zeros(64, 64), "extra.weight": torch.zeros(2)}))
    assert expect_error(engine_copy, WEIGHTS, "unexpected tensor").field == "extra.weight"


def test_tensor_dtype_disagrees_with_config(engine_copy: Path) -> None:
    name = "transformer.ln_f.weight"
    _rewrite_weights(engine_copy, lambda t: t.__setitem__(name, t[name].half()))
    assert expect_error(engine_copy, WEIGHTS, "dtype").field == name


def test_llm_config_bad_json_and_missing_key(engine_copy: Path) -> None:
    (engine_copy / CONFIG).write_text("{not json")
    resign(engine_copy)
    expect_error(engine_copy, CONFIG, "invalid JSON")
    cfg = {"architecture": "Qwen2ForCausalLM", "dtype": "float32"}
    (engine_copy / CONFIG).write_text(json.dumps(cfg))
    resign(engine_copy)
    assert expect_error(engine_copy, CONFIG, "missing key").field == "vocab_size"


@pytest.mark.parametrize("path", ["../outside/config.json", "/etc/passwd", "llm/../../x.json"])
def test_manifest_path_escaping_directory(engine_copy: Path, path: str) -> None:
    resign(engine_copy, lambda d: d["components"]["llm"].__setitem__("config", path))
    err = expect_error(engine_copy, MANIFEST)
    assert err.field == "components.llm.config"
    assert "relative" in str(err) or "escapes" in str(err)


def test_files_entry_escaping_directory(engine_copy: Path) -> None:
    data = manifest(engine_copy)
    data["files"]["../../etc/hostname"] = {"sha256": "0" * 64, "size": 1}
    (engine_copy / MANIFEST).write_text(json.dumps(data))
    assert "escapes" in str(expect_error(engine_copy, MANIFEST))


def test_symlink_escaping_directory(engine_copy: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    shutil.copy(engine_copy / CONFIG, outside)
    (engine_copy / CONFIG).unlink()
    (engine_copy / CONFIG).symlink_to(outside)
    data = manifest(engine_copy)
    (engine_copy / MANIFEST).write_text(json.dumps(data))
    assert "escapes" in str(expect_error(engine_copy, MANIFEST))


def test_eos_outside_vocabulary(engine_copy: Path) -> None:
    resign(engine_copy, lambda d: d["generation"].__setitem__("eos_token_ids", [10 ** 9]))
    assert expect_error(engine_copy, MANIFEST).field == "generation.eos_token_ids"


def test_unsupported_architecture(engine_copy: Path) -> None:
    cfg = json.loads((engine_copy / CONFIG).read_text())
    cfg["architecture"] = "GPT2LMHeadModel"
    (engine_copy / CONFIG).write_text(json.dumps(cfg))
    resign(engine_copy)
    assert expect_error(engine_copy, CONFIG, "not supported").field == "architecture"


# ------------------------------------------------- parts that parse but disagree (checksums re-signed)

TOKENIZER = "tokenizer/tokenizer.json"


def _edit_json(root: Path, rel: str, edit: Callable[[dict], None]) -> None:
    data = json.loads((root / rel).read_text())
    edit(data)
    (root / rel).write_text(json.dumps(data))
    resign(root)


@pytest.mark.parametrize(("content", "fragment"), [
    ('{"version": "1.0", "model": ', "invalid JSON (line 1"),
    ("{}", "not a tokenizer the tokenizers library can read"),
    ("[1, 2]", "expected a JSON object"),
])
def test_tokenizer_json_unreadable(engine_copy: Path, content: str, fragment: str) -> None:
    (engine_copy / TOKENIZER).write_text(content)
    resign(engine_copy)
    expect_error(engine_copy, TOKENIZER, fragment)


def test_tokenizer_ids_beyond_the_vocabulary(engine_copy: Path) -> None:
    vocab_size = json.loads((engine_copy / CONFIG).read_text())["vocab_size"]
    _edit_json(engine_copy, TOKENIZER, lambda t: t["added_tokens"].append(
        {"id": vocab_size + 5, "content": "<|extra|>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}))
    expect_error(engine_copy, TOKENIZER, "is outside the checkpoint's vocabulary", f"vocab_size {vocab_size}")


def test_tokenizer_config_and_chat_template_must_parse(engine_copy: Path) -> None:
    (engine_copy / "tokenizer/tokenizer_config.json").write_text("{,}")
    resign(engine_copy)
    expect_error(engine_copy, "tokenizer/tokenizer_config.json", "invalid JSON")
    shutil.copytree(engine_copy, engine_copy.parent / "second")
    second = engine_copy.parent / "second"
    (second / "tokenizer/tokenizer_config.json").write_text("{}")
    (second / "tokenizer/chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    resign(second)
    expect_error(second, "tokenizer/chat_template.jinja", "not a valid Jinja template")


@pytest.mark.parametrize(("edit", "field", "fragment"), [
    ({"max_input_len": 4096, "max_seq_len": 2048}, "build.max_input_len", "exceeds build.max_seq_len (2048)"),
    ({"max_num_tokens": 8, "tokens_per_block": 16}, "build.max_num_tokens", "below build.tokens_per_block (16)"),
    ({"tokens_per_block": 24}, "build.tokens_per_block", "not a power of 2"),
    ({"max_input_len": 1024, "max_seq_len": 10 ** 6}, "build.max_seq_len", "max_position_embeddings"),
    ({"dtype": "bf16"}, "build.dtype", "disagrees with llm/config.json dtype 'float32'"),
])
def test_build_limits_that_contradict(engine_copy: Path, edit: dict, field: str, fragment: str) -> None:
    resign(engine_copy, lambda d: d["build"].update(edit))
    assert expect_error(engine_copy, MANIFEST, fragment).field == field


def test_pad_token_outside_vocabulary(engine_copy: Path) -> None:
    resign(engine_copy, lambda d: d["generation"].__setitem__("pad_token_id", -1))
    assert expect_error(engine_copy, MANIFEST).field == "generation.pad_token_id"


def test_serve_exits_2_with_one_line_naming_the_file(engine_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """trtserve-serve's entry point: a tokenizer.json of `{}` (a KeyError traceback before) ends it with status 2
    and one error line naming the file (no other exception escapes main)."""
    from grpc_service.server_cli import main, parse_args

    (engine_copy / TOKENIZER).write_text("{}")
    resign(engine_copy)
    argv = ["--engine", str(engine_copy), "--host", "127.0.0.1", "--port", "0", "--no-metrics"]
    if hasattr(parse_args(argv), "http_port"):
        argv += ["--http-port", "0"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trtserve-serve: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"trtserve-serve: error: {TOKENIZER}: "), errors


def test_serve_names_the_engine_for_failures_the_loader_cannot_name(engine_copy: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A failure deep inside a library while the engine loads (transformers raises a TypeError on a
    tokenizer_config.json whose added_tokens_decoder holds an int, long after the loader's checks): still
    status 2 and one line, naming the engine directory and the library's complaint. The failure is injected
    where the server loads the engine (loading the whole engine first would cost this test ~15 s)."""
    import grpc_service.engine_host as engine_host
    from grpc_service.server_cli import main, parse_args

    def fail(*args: object) -> None:
        raise TypeError("Found a <class 'int'> in the saved `added_tokens_decoder`")

    monkeypatch.setattr(engine_host.StartedEngine, "start", staticmethod(fail))
    argv = ["--engine", str(engine_copy), "--host", "127.0.0.1", "--port", "0", "--no-metrics"]
    if hasattr(parse_args(argv), "http_port"):
        argv += ["--http-port", "0"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trtserve-serve: error:")]
    assert errors == [f"trtserve-serve: error: {engine_copy}: cannot be loaded (TypeError: Found a <class 'int'> "
                      "in the saved `added_tokens_decoder`)"], errors
