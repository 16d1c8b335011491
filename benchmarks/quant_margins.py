"""How flat are a model's logits, and which top-1 choices does each quantized engine flip?

What it is for: the table "How a quantized build is judged" in docs/perf/quantization.md. For each
quantized engine directory it teacher-forces the validation's text sequences (builder/validate.py's
prompts + the float model's 16 greedy tokens, as builder/quantize_validate.py does) through the same
model unquantized and through the engine, and prints one JSON line: the float model's top-1 vs top-2
margin quantiles (nats), top-1 agreement on all positions and on those whose margin is at least 0.1 /
0.25 / 0.5 / 1 / 2 nats (with their count), mean KL, and the logit error's spread against the logits'
own. With --dtype-baseline it also compares the float model in the engine's dtype against fp32 (what
rounding alone flips).
Not for: the build's pass / fail rule (builder/quantize_validate.py) or timing.

    python benchmarks/quant_margins.py ENGINE_DIR [ENGINE_DIR ...] [--dtype-baseline]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from builder.convert import convert_state_dict, read_hf_state_dict
from builder.quantize_validate import _teacher_forced
from builder.validate import PROMPTS
from engine_format.engine_dir import LoadedEngine, load_engine
from engine_format.llm_config import LLMConfig
from runtime.executor.model import DecoderModel
from runtime.executor.sequential import SequentialRunner

MARGINS = (0.1, 0.25, 0.5, 1.0, 2.0)
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
NUM_NEW_TOKENS = 16


def logits_pair(engine: LoadedEngine, ref_cfg: LLMConfig, ref_tensors: dict[str, torch.Tensor],
                cfg: LLMConfig, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced float64 logits of the reference and the compared model over the validation sequences."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine.tokenizer_dir))
    cpu, block = torch.device("cpu"), engine.build.tokens_per_block
    reference, compared = DecoderModel(ref_cfg, ref_tensors, cpu), DecoderModel(cfg, tensors, cpu)
    sequences = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        runner = SequentialRunner(reference, len(ids) + NUM_NEW_TOKENS, block)
        sequences.append(ids + runner.greedy(ids, NUM_NEW_TOKENS))
    ref = torch.cat([_teacher_forced(reference, s, block) for s in sequences]).double()
    out = torch.cat([_teacher_forced(compared, s, block) for s in sequences]).double()
    return ref, out


def margin_stats(name: str, ref: torch.Tensor, out: torch.Tensor) -> dict[str, object]:
    top2 = ref.topk(2, -1).values
    margin = top2[:, 0] - top2[:, 1]
    agree = ref.argmax(-1) == out.argmax(-1)
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    stats: dict[str, object] = {
        "name": name, "positions": int(ref.shape[0]), "top1_agreement": round(float(agree.float().mean()), 3),
        "kl_divergence": float((log_p.exp() * (log_p - log_q)).sum(-1).mean()),
        "logit_std": round(float(ref.std(-1).mean()), 3), "logit_error_std": round(float((out - ref).std(-1).mean()), 3),
        "margin_quantiles": {str(q): round(float(margin.quantile(q)), 3) for q in QUANTILES}}
    for m in MARGINS:
        chosen = margin >= m
        stats[f"margin>={m}"] = {"positions": int(chosen.sum()),
                                 "top1_agreement": round(float(agree[chosen].float().mean()), 3) if chosen.any() else None}
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("engines", nargs="+", type=Path)
    parser.add_argument("--dtype-baseline", action="store_true")
    args = parser.parse_args()
    for directory in args.engines:
        engine = load_engine(directory)
        hf_dir = Path(json.loads((directory / "engine.json").read_text())["source"]["path"])
        state = read_hf_state_dict(hf_dir)
        float_cfg = dataclasses.replace(engine.llm_config, quant=dataclasses.replace(
            engine.llm_config.quant, quant_algo=None, kv_cache_quant_algo=None))
        float_tensors = convert_state_dict(state, float_cfg)
        ref, out = logits_pair(engine, float_cfg, float_tensors, engine.llm_config, engine.weights)
        print(json.dumps(margin_stats(directory.name, ref, out)), flush=True)
        if args.dtype_baseline and float_cfg.dtype != "float32":
            fp32 = dataclasses.replace(float_cfg, dtype="float32")
            ref, out = logits_pair(engine, fp32, convert_state_dict(state, fp32), float_cfg, float_tensors)
            print(json.dumps(margin_stats(f"{float_cfg.dtype} vs float32, unquantized", ref, out)), flush=True)


if __name__ == "__main__":
    main()
