"""Parity of a built engine against the HF reference model.

What it is for: the `validation.json` report. The engine (loaded back from the
directory by the caller, as the server will load it) and HF transformers run the same fixed
prompts in the same dtype; HF generates greedily and the engine is fed the
same tokens (teacher forcing), so every position is compared: max absolute and
relative logit error, and greedy agreement. A disagreement counts as decisive
only where the reference's top-1 margin exceeds twice the tolerance (random
weights can tie). Both models' perplexity on a fixed real text
(builder/perplexity.py) is recorded side by side. A GGUF source is compared
with transformers' own load of the GGUF file, not with the checkpoint derived from it.
Not for: unit-test assertions (tests compare directly, with their own tolerances).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from builder.gguf_source import load_gguf_reference
from builder.perplexity import MAX_TEXT_TOKENS, perplexity_report
from engine_format.engine_dir import LoadedEngine
from runtime.executor.model import DecoderModel
from runtime.executor.sequential import SequentialRunner

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "你好，请介绍一下你自己。",
)
# Max |engine - HF| allowed, relative to max(1, max |HF logit|).
TOLERANCE = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 6e-2}
# |engine perplexity / HF perplexity - 1| allowed on the reference text.
PERPLEXITY_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def load_hf_reference(hf_dir: Path, vision_language: bool, dtype: torch.dtype, gguf_file: Path | None = None) -> Any:
    """The HF model an engine is compared with (vision-language checkpoints load through the image-text-to-text
    class; a GGUF source through transformers' GGUF loader)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if gguf_file is not None:
        return load_gguf_reference(gguf_file, dtype)
    auto_class = AutoModelForImageTextToText if vision_language else AutoModelForCausalLM
    return auto_class.from_pretrained(str(hf_dir), dtype=dtype).eval()


def validate_engine(engine: LoadedEngine, hf_dir: Path, num_new_tokens: int = 16,
                    gguf_file: Path | None = None, perplexity_tokens: int = MAX_TEXT_TOKENS,
                    reference: Any | None = None) -> dict[str, Any]:
    """Text prompts only: on a VL engine M-RoPE with three equal axes is 1-D RoPE, in HF and here.
    `reference`: the caller's own load of exactly the model `load_hf_reference` would load (same source, the
    engine's dtype, eval mode), so a caller holding it already does not load it a second time."""
    from transformers import AutoTokenizer

    dtype = getattr(torch, engine.llm_config.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))
    if reference is None:
        hf = load_hf_reference(hf_dir, engine.vision is not None, dtype, gguf_file)
    elif reference.dtype != dtype or reference.training:
        raise ValueError(f"reference: the preloaded reference model must be {dtype} in eval mode "
                         f"(got {reference.dtype}, training={reference.training})")
    else:
        hf = reference
    model = DecoderModel(engine.llm_config, engine.weights, torch.device("cpu"))
    tol = TOLERANCE[engine.llm_config.dtype]
    prompts = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        runner = SequentialRunner(model, len(ids) + num_new_tokens, engine.build.tokens_per_block)
        prompts.append(_compare(hf, runner, ids, num_new_tokens, tol))
        del runner
    max_abs = max(p["max_abs_err"] for p in prompts)
    scale = max(1.0, max(p["max_abs_ref"] for p in prompts))
    decisive = sum(p["decisive_disagreements"] for p in prompts)
    ppl = perplexity_report(model, hf, tokenizer, engine.build.max_seq_len, engine.build.tokens_per_block,
                            perplexity_tokens)
    ppl_tol = PERPLEXITY_TOLERANCE[engine.llm_config.dtype]
    return {
        "reference": f"transformers {__import__('transformers').__version__}, {engine.llm_config.dtype}, cpu",
        "dtype": engine.llm_config.dtype,
        "tolerance": {"max_abs_err_over_scale": tol, "perplexity_rel_diff": ppl_tol},
        "num_prompts": len(prompts), "tokens_per_prompt": num_new_tokens,
        "max_abs_err": max_abs, "max_rel_err": max_abs / scale,
        "greedy_agreement": sum(p["greedy_agree"] for p in prompts) / sum(p["positions"] for p in prompts),
        "decisive_disagreements": decisive,
        "perplexity": ppl,
        "passed": bool(max_abs / scale <= tol and decisive == 0 and ppl["rel_diff"] <= ppl_tol),
        "prompts": prompts,
    }


@torch.inference_mode()
def _compare(hf: Any, runner: SequentialRunner, ids: list[int], n: int, tol: float) -> dict[str, Any]:
    generated = torch.tensor(ids + hf_greedy(hf, ids, n))
    ref = hf(generated[None]).logits[0, len(ids) - 1:-1].float()          # predicts generated tokens
    runner.reset()
    ours = torch.cat([runner.feed(ids)[None], runner.feed(generated[len(ids):-1].tolist(), all_logits=True)])
    err = (ours - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = ours.argmax(-1) == ref.argmax(-1)
    bound = 2 * tol * max(1.0, float(ref.abs().max()))
    return {
        "prompt_tokens": len(ids), "positions": int(ref.shape[0]),
        "max_abs_err": float(err.max()), "max_abs_ref": float(ref.abs().max()),
        "greedy_agree": int(agree.sum()),
        "decisive_disagreements": int((~agree & (margin > bound)).sum()),
    }


@torch.inference_mode()
def hf_greedy(hf: Any, ids: list[int], n: int) -> list[int]:
    """The n tokens HF greedy decoding appends to `ids`, with its own KV cache and EOS ignored (no
    generation-config processors involved)."""
    out: list[int] = []
    step_input, past = torch.tensor([ids]), None
    for _ in range(n):
        result = hf(step_input, past_key_values=past, use_cache=True)
        past = result.past_key_values
        out.append(int(result.logits[0, -1].argmax()))
        step_input = torch.tensor([[out[-1]]])
    return out
