"""Turn a GGUF file (Llama or Qwen2) into an ordinary HF checkpoint directory, cached by content.

What it is for: GGUF as a build input. The file's header is checked (magic,
architecture, tensor table inside the file) so a wrong file fails with one
line naming it; the weights are dequantized to float32 by the `gguf` package
(the llama.cpp project's own reader), renamed to the HF names and, for Llama,
the query / key rows are put back in HF's rotary order (llama.cpp's converter
interleaves them); the HF config is read from the GGUF metadata; the tokenizer
and chat template are converted from the metadata by transformers' own GGUF
tokenizer loader. The result is written once under
`<cache>/gguf-checkpoints/<name>-<sha256>` and then takes exactly the path of
any other HF directory. `load_gguf_reference` is the transformers load of the
same file that validation compares with.
Not for: weight layout conversion (builder/convert.py) or quantized execution
of GGUF blocks (weights always leave here dequantized).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.source import SourceError
from engine_format.engine_dir import sha256_file

GGUF_MAGIC = b"GGUF"
GGUF_CHECKPOINT_VERSION = 1        # bump when the written checkpoint changes for the same file
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# GGUF per-layer tensor name -> HF name inside `model.layers.{i}.`
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}


@dataclass(frozen=True, slots=True)
class GGUFCheckpoint:
    """An HF checkpoint directory made from a GGUF file."""

    hf_dir: Path
    gguf_file: Path
    sha256: str
    architecture: str


def check_gguf_file(path: Path) -> None:
    """One clear line for a file that is not a GGUF file at all."""
    if not path.is_file():
        raise SourceError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (starts with {head!r}, a GGUF file starts with b'GGUF')")


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` whose header and tensor table were read to the end and lie inside the file."""
    try:
        import gguf
    except ImportError:
        raise SourceError(f"{path}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    check_gguf_file(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, TypeError, OSError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else exc.__class__.__name__
        raise SourceError(f"{path}: truncated or corrupt GGUF file ({detail})") from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise SourceError(f"{path}: truncated GGUF file (tensor {tensor.name!r} ends at byte {end}, "
                              f"the file has {size} bytes)")
    return reader


def metadata_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: Any, path: Path) -> str:
    arch = metadata_value(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise SourceError(f"{path}: GGUF architecture {arch!r} is not supported "
                          f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    return arch


def hf_config_from_gguf(reader: Any, arch: str, path: Path, vocab_size: int) -> dict[str, Any]:
    """HF config kwargs from the `<arch>.*` metadata (the same keys transformers reads)."""
    def need(key: str) -> Any:
        value = metadata_value(reader, f"{arch}.{key}")
        if value is None:
            raise SourceError(f"{path}: GGUF metadata key '{arch}.{key}' is missing")
        return value

    heads = int(need("attention.head_count"))
    hidden = int(need("embedding_length"))
    scaling = metadata_value(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        kind = "rope_freqs.weight (Llama 3 frequencies)" if scaling in ("none", "linear") else repr(scaling)
        raise SourceError(f"{path}: GGUF rope scaling {kind} is not supported (none, linear)")
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(metadata_value(
        reader, f"{arch}.rope.freq_base", 10000.0))}
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(need("rope.scaling.factor")))
    config = {
        "vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")), "num_attention_heads": heads,
        "num_key_value_heads": int(metadata_value(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(metadata_value(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(need("context_length")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")), "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in {t.name for t in reader.tensors},
        "hidden_act": "silu",
    }
    for name in ("bos", "eos", "padding"):
        value = metadata_value(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(value)
    if arch == "qwen2":
        config["attention_bias"] = True
    return config


def hf_state_dict_from_gguf(reader: Any, arch: str, path: Path, config: dict[str, Any]) -> dict[str, Any]:
    """Dequantized float32 tensors under HF names; Llama q/k rows back in HF's rotary order."""
    import numpy as np
    import torch
    from gguf import quants

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = _hf_name(tensor.name, path)
        try:
            array = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise SourceError(f"{path}: tensor {tensor.name!r} has GGML type {tensor.tensor_type.name}, "
                              "which the gguf package cannot dequantize") from None
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            array = _unpermute_rotary_rows(array, heads)
        state[name] = torch.from_numpy(array.copy())
    return state


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise SourceError(f"{path}: GGUF tensor {gguf_name!r} has no Llama / Qwen2 counterpart")


def _unpermute_rotary_rows(weight: Any, num_heads: int) -> Any:
    """Inverse of llama.cpp's `permute`: per head, rows (pairs interleaved) -> (first half, second half)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_checkpoint(path: Path, cache_dir: Path) -> GGUFCheckpoint:
    """The HF checkpoint directory of a GGUF file, written on first use (atomically) and cached."""
    path = path.expanduser().resolve()
    check_gguf_file(path)
    sha = sha256_file(path)
    out_dir = cache_dir / "gguf-checkpoints" / f"{path.stem}-v{GGUF_CHECKPOINT_VERSION}-{sha[:16]}"
    if (out_dir / "model.safetensors").is_file():
        # This content was read, checked and converted when the directory was written: parsing the file's
        # metadata again (tens of thousands of tokenizer entries, seconds in Python) would find the same.
        architecture = json.loads((out_dir / "config.json").read_text())["architectures"][0]
        return GGUFCheckpoint(out_dir, path, sha, architecture)
    reader = open_gguf(path)
    arch = gguf_architecture(reader, path)
    _write_checkpoint(reader, arch, path, out_dir)
    return GGUFCheckpoint(out_dir, path, sha, GGUF_ARCHITECTURES[arch])


def _write_checkpoint(reader: Any, arch: str, path: Path, out_dir: Path) -> None:
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise SourceError(f"{path}: GGUF tensor 'token_embd.weight' is missing")
    config_kwargs = hf_config_from_gguf(reader, arch, path, vocab_size=int(embedding.shape[-1]))
    state = hf_state_dict_from_gguf(reader, arch, path, config_kwargs)
    config = AutoConfig.for_model(arch, **config_kwargs)
    config.architectures = [GGUF_ARCHITECTURES[arch]]
    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    config.save_pretrained(str(tmp_dir))
    if config_kwargs.get("eos_token_id") is not None:
        (tmp_dir / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": config_kwargs.get("bos_token_id"), "eos_token_id": config_kwargs["eos_token_id"],
             "pad_token_id": config_kwargs.get("pad_token_id")}, indent=2) + "\n")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, NotImplementedError) as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise SourceError(f"{path}: transformers cannot convert this GGUF tokenizer ({exc})") from None
    tokenizer.save_pretrained(str(tmp_dir))
    save_file(state, str(tmp_dir / "model.safetensors"), metadata={"format": "pt", "source": "gguf"})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.replace(out_dir)


def load_gguf_reference(gguf_file: Path, dtype: Any) -> Any:
    """transformers' own load of a GGUF file (`from_pretrained(dir, gguf_file=...)`), in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                dtype=dtype).eval()
