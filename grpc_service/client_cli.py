"""`trtserve-client`: talk to a trtserve server (or any Triton TensorRT-LLM server) from the shell.

  trtserve-client generate "The capital of France is" --max-tokens 16
  trtserve-client stream "Once upon a time"            # prints the text as it arrives
  trtserve-client chat "Write one sentence about the sea." --system "You are terse."
  trtserve-client health
  trtserve-client models
  trtserve-client --api triton stream "Once upon a time"  # the same through KServe v2 / tritonclient
  trtserve-client chat "Describe the image." --image cat.png             # vision-language engines
  trtserve-client generate "What happens?" --video clip.gif --video-fps 4
  trtserve-client --api triton generate "Describe it." --image cat.png  # image_bytes_input pixels
  trtserve-client --api triton generate "What moves?" --video a.png --video b.png --video-frames

`--api native` (default) uses trtserve.v1.LLMService; `--api triton` sends the
tensors of Triton's TensorRT-LLM `ensemble` model with tritonclient (chat needs
the native API: the ensemble takes raw text, without a chat template).
`--image` (repeatable) and `--video` take a file (sent as bytes) or a URL
(data:, file://, http(s)://: the server resolves it under its URL policy);
`--video` may also be given several times with `--video-frames` to send the
files as one video's frames. With `chat` they go into the user message before
the text; with `generate` / `stream` they go with the text prompt. With
`--api triton`, images are files sent as pixels (one size) or URLs, and
`--video` is one file sent as an encoded video, or with `--video-frames` image
files sent as the frames' pixels (one size), as `video_bytes_input`: no video
URLs, and no `--video-fps` (the ensemble takes frames as 2 per second).
"""
from __future__ import annotations

import argparse
import sys

import grpc
import numpy as np
from tritonclient.utils import InferenceServerException

from grpc_service.client import (
    DEFAULT_TARGET,
    Completion,
    ImageInput,
    NativeClient,
    Sampling,
    TritonClient,
    chat_message,
    collect,
    image_proto,
    video_proto,
)
from grpc_service.proto import trtserve_pb2 as pb

URL_SCHEMES = ("data:", "file:", "http:", "https:")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trtserve-client", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=DEFAULT_TARGET, help=f"server address (default {DEFAULT_TARGET})")
    p.add_argument("--api", choices=("native", "triton"), default="native")
    p.add_argument("--model", default="", help="native: engine name; triton: model name (default ensemble)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds (the RPC deadline)")
    commands = p.add_subparsers(dest="command", required=True)
    for name in ("generate", "stream", "chat"):
        sub = commands.add_parser(name)
        sub.add_argument("prompt")
        sub.add_argument("--max-tokens", type=int, default=64)
        sub.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        sub.add_argument("--top-k", type=int)
        sub.add_argument("--top-p", type=float)
        sub.add_argument("--seed", type=int)
        sub.add_argument("--stop", action="append", default=[])
        sub.add_argument("--ignore-eos", action="store_true", help="native only")
        if name == "chat":
            sub.add_argument("--system", help="system message")
        sub.add_argument("--image", action="append", default=[], help="image file or URL (repeatable)")
        sub.add_argument("--video", action="append", default=[],
                         help="video / animated image file or URL (repeatable)")
        sub.add_argument("--video-frames", action="store_true",
                         help="the --video files are the frames of one video, in order")
        sub.add_argument("--video-fps", type=float, help="frames per second of the video(s)")
    commands.add_parser("health")
    commands.add_parser("models")
    return p.parse_args(argv)


def sampling_from_args(args: argparse.Namespace) -> Sampling:
    return Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop))


def media_input(value: str) -> ImageInput:
    """A URL as is, a file as its bytes."""
    if value.lower().startswith(URL_SCHEMES):
        return value
    with open(value, "rb") as handle:
        return handle.read()


def videos_from_args(args: argparse.Namespace) -> list[pb.Video]:
    if args.video_frames and args.video:
        frames = [media_input(v) for v in args.video]
        if any(isinstance(f, str) for f in frames):
            raise ValueError("--video-frames needs files, not URLs")
        return [video_proto([f for f in frames if isinstance(f, bytes)], args.video_fps)]
    return [video_proto(media_input(v), args.video_fps) for v in args.video]


def run_native(args: argparse.Namespace) -> int:
    with NativeClient(args.url, timeout_s=args.timeout) as client:
        if args.command == "health":
            status = client.health()
            print(status)
            return 0 if status == "SERVING" else 1
        if args.command == "models":
            for card in client.models():
                print(f"{card.name}\tready={card.ready}\tmax_input_len={card.max_input_len}\t"
                      f"max_seq_len={card.max_seq_len}\tvocab={card.vocab_size}")
            return 0
        sampling = sampling_from_args(args)
        images = [media_input(i) for i in args.image]
        videos = videos_from_args(args)
        if args.command == "chat":
            system = [pb.ChatMessage(role="system", content=args.system)] if args.system else []
            user = chat_message("user", *[image_proto(i) for i in images], *videos, args.prompt)
            responses = client.stream_chat(system + [user], sampling, args.model)
        else:
            responses = client.stream(args.prompt, sampling, args.model, images=images, videos=videos)
        if args.command == "generate":
            print_completion(collect(responses))
            return 0
        last = None
        for last in responses:
            print(last.text, end="", flush=True)
        if last is not None:
            print(f"\n[{last.finish_reason}: {last.usage.prompt_tokens} prompt + "
                  f"{last.usage.completion_tokens} generated tokens]")
        return 0


def print_completion(completion: Completion) -> None:
    print(completion.text)
    print(f"[{completion.finish_reason}: {completion.prompt_tokens} prompt + {completion.completion_tokens} "
          f"generated tokens, {completion.cached_tokens} from the prefix cache]", file=sys.stderr)


def run_triton(args: argparse.Namespace) -> int:
    with TritonClient(args.url, model=args.model or "ensemble", timeout_s=args.timeout) as client:
        if args.command == "health":
            ready = client.ready()
            print("SERVING" if ready else "NOT_SERVING")
            return 0 if ready else 1
        if args.command == "models":
            for name, state in client.models():
                print(f"{name}\t{state}")
            return 0
        if args.command == "chat":
            print("trtserve-client: error: chat needs --api native (the ensemble takes raw text)", file=sys.stderr)
            return 2
        sampling = sampling_from_args(args)
        if args.video_fps is not None:
            print("trtserve-client: error: --video-fps needs --api native (the ensemble takes video frames as "
                  "2 per second)", file=sys.stderr)
            return 2
        pixels = [image_pixels(i) for i in args.image if not i.lower().startswith(URL_SCHEMES)]
        urls = [i for i in args.image if i.lower().startswith(URL_SCHEMES)]
        videos = [ensemble_video(args.video, args.video_frames)] if args.video else []
        if args.command == "generate":
            print(client.generate(args.prompt, sampling, images=pixels, image_urls=urls, videos=videos))
            return 0
        for delta in client.stream(args.prompt, sampling, images=pixels, image_urls=urls, videos=videos):
            print(delta, end="", flush=True)
        print()
        return 0


def image_pixels(path: str) -> np.ndarray:
    """A file as the uint8 [H, W, 3] pixels the multimodal ensemble takes (images of one request must
    share a size, as in Triton's client)."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def ensemble_video(paths: list[str], as_frames: bool) -> np.ndarray:
    """--video files as the ensemble's video_bytes_input: one encoded video [1, 1, 1, num_bytes], or with
    --video-frames the files' pixels as frames [num_frames, H, W, 3] (all of one size)."""
    if any(path.lower().startswith(URL_SCHEMES) for path in paths):
        raise ValueError("--api triton sends video files, not URLs (the ensemble has no video URL input)")
    if as_frames:
        frames = [image_pixels(path) for path in paths]
        if len({frame.shape for frame in frames}) > 1:
            raise ValueError(f"--video-frames: the frames differ in size {sorted({f.shape for f in frames})}; "
                             "the ensemble takes frames of one size")
        return np.stack(frames)
    if len(paths) > 1:
        raise ValueError(f"--api triton sends one video per request, got {len(paths)} --video files "
                         "(add --video-frames to send them as one video's frames)")
    with open(paths[0], "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8).reshape(1, 1, 1, -1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run_native(args) if args.api == "native" else run_triton(args)
    except grpc.RpcError as exc:
        print(f"trtserve-client: error: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except (RuntimeError, InferenceServerException) as exc:     # tritonclient's errors
        print(f"trtserve-client: error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:                          # unreadable --image / --video
        print(f"trtserve-client: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
