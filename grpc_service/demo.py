"""`make demo`, second half: start the server on an engine, ask it questions through every API, stop it.

Starts `trtserve-serve` on free loopback ports and asks a few questions,
greedily, through the native API (chat messages, streamed), the Triton
protocol (tritonclient against the `ensemble` model, exactly as a Triton
TensorRT-LLM client would: the client renders the chat template and sends the
text) and the OpenAI-compatible HTTP API (`/v1/chat/completions`), printing
each answer; then a summary of the server's Prometheus metrics, SIGTERM and
the exit code. `make demo` serves smollm2-135m, a real pretrained model, so the
answers are real. With `--vl-engine`, it then serves a vision-language engine
the same way and sends one chat request holding an image made in code (a
gradient PNG).
Not for: benchmarking (requests here are one at a time).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from grpc_service.client import (
    NativeClient,
    Sampling,
    TritonClient,
    chat_message,
    image_proto,
)
from grpc_service.launcher import ServerProcess, metric_value


QUESTIONS = ("What is the capital of France?", "What is the chemical symbol for gold?",
             "What is the boiling point of water in Celsius?")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grpc_service.demo", description=__doc__)
    p.add_argument("--engine", required=True, type=Path)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--question", action="append", dest="questions",
                   help=f"a question to ask (repeatable; default: {' / '.join(QUESTIONS)})")
    p.add_argument("--vl-engine", type=Path, help="a vision-language engine: one image request after the rest")
    return p.parse_args(argv)


def gradient_png(width: int = 96, height: int = 64) -> bytes:
    """A small RGB gradient, encoded as PNG (the demo's image: no files, no downloads)."""
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // (width - 1), ys * 255 // (height - 1), np.full_like(xs, 128)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_chat(engine: Path, max_tokens: int) -> int:
    print(f"--- starting trtserve-serve --engine {engine} (vision-language)")
    server = ServerProcess.start(["--engine", str(engine), "--log-level", "WARNING"])
    try:
        png = gradient_png()
        print(f"--- native API, a chat request with one image (a {len(png)}-byte 96x64 gradient PNG made in code)")
        with NativeClient(server.target, timeout_s=120) as client:
            message = chat_message("user", image_proto(png), "Describe this image.")
            last = None
            for last in client.stream_chat([message], Sampling(max_tokens=max_tokens)):
                print(last.text, end="", flush=True)
        if last is not None:
            print(f"\n[finish: {last.finish_reason}; {last.usage.prompt_tokens} prompt tokens (image placeholders "
                  f"included) + {last.usage.completion_tokens} generated]")
    finally:
        code = server.terminate()
    print(f"--- SIGTERM: server drained and exited with code {code}")
    return code


def native_chat(target: str, questions: list[str], max_tokens: int) -> None:
    print("--- native API (trtserve.v1.LLMService/Generate), chat messages, greedy, streamed")
    with NativeClient(target, timeout_s=600) as client:
        for question in questions:
            print(f"Q: {question}\nA: ", end="", flush=True)
            last = None
            for last in client.stream_chat([("user", question)], Sampling(max_tokens=max_tokens, temperature=0.0)):
                print(last.text, end="", flush=True)
            if last is not None:
                print(f"\n[finish: {last.finish_reason}; {last.usage.prompt_tokens} prompt + "
                      f"{last.usage.completion_tokens} generated tokens]")


def chat_prompt(engine: Path, question: str) -> str:
    """The chat template rendered client-side, as Triton TensorRT-LLM clients do (text_input is plain text)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(engine / "tokenizer"))
    return str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True))


def triton_chat(target: str, engine: Path, questions: list[str], max_tokens: int) -> None:
    print("--- Triton protocol (KServe v2 ModelStreamInfer, model 'ensemble', tritonclient), greedy, streamed")
    with TritonClient(target, model="ensemble") as client:
        for question in questions:
            print(f"Q: {question}\nA: ", end="", flush=True)
            pieces = []
            for delta in client.stream(chat_prompt(engine, question), Sampling(max_tokens=max_tokens,
                                                                                 temperature=0.0)):
                pieces.append(delta)
                print(delta, end="", flush=True)
            print(f"\n[finish: triton_final_response; {len(pieces)} streamed responses]")


def openai_chat(base_url: str, model: str, questions: list[str], max_tokens: int) -> None:
    print("--- OpenAI-compatible HTTP API (POST /v1/chat/completions), greedy")
    for question in questions:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": question}],
                           "max_tokens": max_tokens, "temperature": 0.0}).encode()
        request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            reply = json.loads(response.read())
        choice = reply["choices"][0]
        print(f"Q: {question}\nA: {choice['message']['content']}\n[finish: {choice['finish_reason']}; "
              f"{reply['usage']['prompt_tokens']} prompt + {reply['usage']['completion_tokens']} generated tokens]")


def metrics_summary(text: str, model: str) -> None:
    print("--- server metrics (Prometheus, /metrics)")
    outcomes = {api: metric_value(text, "trtserve_requests_total", model=model, api=api, outcome="length")
                + metric_value(text, "trtserve_requests_total", model=model, api=api, outcome="stop")
                for api in ("native", "kserve")}
    print(f"requests completed: native {outcomes['native']:.0f}, kserve {outcomes['kserve']:.0f}")
    for label, name in (("TTFT", "trtserve_time_to_first_token_seconds"),
                        ("TPOT", "trtserve_time_per_output_token_seconds"),
                        ("end-to-end", "trtserve_request_latency_seconds")):
        count = sum(metric_value(text, f"{name}_count", model=model, api=api) for api in ("native", "kserve"))
        total = sum(metric_value(text, f"{name}_sum", model=model, api=api) for api in ("native", "kserve"))
        print(f"mean {label}: {1000 * total / max(count, 1):.1f} ms over {count:.0f} requests")
    print(f"generated tokens: {metric_value(text, 'trtserve_generated_tokens_total', model=model):.0f}; "
          f"KV blocks free {metric_value(text, 'trtserve_kv_blocks', model=model, state='free'):.0f} / "
          f"{metric_value(text, 'trtserve_kv_blocks_total', model=model):.0f}, "
          f"cached {metric_value(text, 'trtserve_kv_blocks', model=model, state='cached'):.0f}; "
          f"prefix hit rate {metric_value(text, 'trtserve_prefix_cache_hit_rate', model=model):.2f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"--- starting trtserve-serve --engine {args.engine}")
    server = ServerProcess.start(["--engine", str(args.engine), "--log-level", "WARNING"])
    try:
        print(f"serving on {server.target} (gRPC), metrics on 127.0.0.1:{server.metrics_port}")
        questions = args.questions or list(QUESTIONS)
        native_chat(server.target, questions, args.max_tokens)
        triton_chat(server.target, args.engine, questions, args.max_tokens)
        with NativeClient(server.target) as client:
            model = client.models()[0].name
        if server.http_port:
            openai_chat(server.http_url, model, questions, args.max_tokens)
        metrics_summary(server.metrics(), model)
    finally:
        code = server.terminate()
    print(f"--- SIGTERM: server drained and exited with code {code}")
    if code == 0 and args.vl_engine is not None:
        code = image_chat(args.vl_engine, args.max_tokens)
    return code


if __name__ == "__main__":
    sys.exit(main())
