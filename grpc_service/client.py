"""Python clients for a trtserve server: the native API, and the Triton (KServe v2) API via tritonclient.

What it is for: `NativeClient` (generate / stream / chat / tokenize /
detokenize / models / model_info / health over `trtserve.v1.LLMService` and
grpc.health.v1) and `TritonClient` (streamed or whole text from the `ensemble`
model, readiness and the model list, with nothing but tritonclient on the
wire, exactly as an existing Triton client would talk). Images and videos
(vision-language engines) go with a text prompt or into the last user chat
message, as encoded bytes or URLs (`image_part`, `video_part`); the Triton
client sends images as the multimodal ensemble's `image_bytes_input` pixels
or `image_url_input`, and one video as its `video_bytes_input`. Both are synchronous
and small on purpose: scripts, the CLI, tests and the demo use them.
Not for: load generation (the benchmark has its own asyncio client).
"""
from __future__ import annotations

import queue
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from grpc_service.proto import trtserve_pb2 as pb
from grpc_service.proto import trtserve_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:8001"
Message = tuple[str, str]              # (role, content)
ImageInput = bytes | str               # encoded image, or a URL (data:, file://, http(s)://)
TRITON_GUIDE_TYPES = {"json_object": "json", "json_schema": "json_schema", "regex": "regex", "ebnf": "ebnf_grammar"}


def image_proto(image: ImageInput) -> pb.Image:
    return pb.Image(data=image) if isinstance(image, bytes) else pb.Image(url=image)


def video_proto(video: ImageInput | Sequence[bytes], fps: float | None = None) -> pb.Video:
    """An encoded video / animated image, a URL, or a list of encoded frames."""
    message = pb.Video(fps=fps) if fps is not None else pb.Video()
    if isinstance(video, bytes):
        message.data = video
    elif isinstance(video, str):
        message.url = video
    else:
        message.frames.frames.extend(video)
    return message


@dataclass(frozen=True, slots=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True, slots=True)
class Sampling:
    """The common sampling knobs; None leaves the server's default."""

    max_tokens: int = 64
    temperature: float | None = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    guide: tuple[str, str] | None = None     # structured output: (json_schema | json_object | regex | ebnf, spec)

    def to_proto(self) -> pb.SamplingParameters:
        message = pb.SamplingParameters(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos, stop=list(self.stop))
        if self.guide is not None:
            kind, spec = self.guide
            message.guided_decoding.CopyFrom(pb.GuidedDecoding(json_object=True) if kind == "json_object"
                                             else pb.GuidedDecoding(**{kind: spec}))
        for name, value in (("temperature", self.temperature), ("top_k", self.top_k), ("top_p", self.top_p),
                            ("seed", self.seed), ("min_tokens", self.min_tokens)):
            if value is not None:
                setattr(message, name, value)
        return message


class NativeClient:
    def __init__(self, target: str = DEFAULT_TARGET, timeout_s: float | None = None) -> None:
        self.channel = grpc.insecure_channel(target)
        self.stub = trtserve_pb2_grpc.LLMServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NativeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, prompt: str | Sequence[int], sampling: Sampling = Sampling(), model: str = "",
               request_id: str = "", images: Sequence[ImageInput] = (),
               videos: Sequence[pb.Video] = ()) -> Iterator[pb.GenerateResponse]:
        """Responses as the server streams them (text and token-id deltas; the last has usage)."""
        request = pb.GenerateRequest(model=model, request_id=request_id, sampling=sampling.to_proto(),
                                     images=[image_proto(i) for i in images], videos=list(videos))
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        return self.stub.Generate(request, timeout=self.timeout_s)

    def stream_chat(self, messages: Sequence[Message | pb.ChatMessage], sampling: Sampling = Sampling(),
                    model: str = "", request_id: str = "") -> Iterator[pb.GenerateResponse]:
        """`messages`: (role, text) pairs, or ChatMessages with parts (see `chat_message`)."""
        request = pb.GenerateRequest(model=model, request_id=request_id, sampling=sampling.to_proto(),
                                     chat=_chat(messages))
        return self.stub.Generate(request, timeout=self.timeout_s)

    def generate(self, prompt: str | Sequence[int], sampling: Sampling = Sampling(), model: str = "",
                 images: Sequence[ImageInput] = (), videos: Sequence[pb.Video] = ()) -> Completion:
        return collect(self.stream(prompt, sampling, model, images=images, videos=videos))

    def chat(self, messages: Sequence[Message | pb.ChatMessage], sampling: Sampling = Sampling(),
             model: str = "") -> Completion:
        return collect(self.stream_chat(messages, sampling, model))

    def tokenize(self, text: str | Sequence[Message | pb.ChatMessage], model: str = "",
                 add_special_tokens: bool = False) -> list[int]:
        request = pb.TokenizeRequest(model=model, add_special_tokens=add_special_tokens)
        if isinstance(text, str):
            request.text = text
        else:
            request.chat.CopyFrom(_chat(text))
        return list(self.stub.Tokenize(request, timeout=self.timeout_s).token_ids)

    def detokenize(self, token_ids: Sequence[int], model: str = "", skip_special_tokens: bool = True) -> str:
        request = pb.DetokenizeRequest(model=model, token_ids=list(token_ids), skip_special_tokens=skip_special_tokens)
        return self.stub.Detokenize(request, timeout=self.timeout_s).text

    def models(self) -> list[pb.ModelCard]:
        return list(self.stub.ListModels(pb.ListModelsRequest(), timeout=self.timeout_s).models)

    def model_info(self, model: str = "") -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(model=model), timeout=self.timeout_s)

    def health(self, service: str = "") -> str:
        """SERVING / NOT_SERVING / SERVICE_UNKNOWN, from grpc.health.v1."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def collect(responses: Iterator[pb.GenerateResponse]) -> Completion:
    text: list[str] = []
    ids: list[int] = []
    last = pb.GenerateResponse()
    for last in responses:
        text.append(last.text)
        ids.extend(last.token_ids)
    usage = last.usage
    return Completion("".join(text), ids, last.finish_reason, usage.prompt_tokens, usage.completion_tokens,
                      usage.cached_tokens)


def chat_message(role: str, *parts: str | pb.Image | pb.Video) -> pb.ChatMessage:
    """A chat message of text, image and video parts, in order (images before text is Qwen-VL's habit)."""
    message = pb.ChatMessage(role=role)
    for part in parts:
        if isinstance(part, str):
            message.parts.add(text=part)
        elif isinstance(part, pb.Image):
            message.parts.add(image=part)
        else:
            message.parts.add(video=part)
    return message


def _chat(messages: Sequence[Message | pb.ChatMessage]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[m if isinstance(m, pb.ChatMessage) else pb.ChatMessage(role=m[0], content=m[1])
                                     for m in messages])


class TritonClient:
    """Talks to the `ensemble` model with tritonclient, the way Triton TensorRT-LLM clients do."""

    def __init__(self, target: str = DEFAULT_TARGET, model: str = "ensemble", timeout_s: float = 120.0) -> None:
        import tritonclient.grpc as triton_grpc

        self._grpc = triton_grpc
        self.client = triton_grpc.InferenceServerClient(target)
        self.model = model
        self.timeout_s = timeout_s

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def inputs(self, prompt: str, sampling: Sampling, stream: bool, images: Sequence[np.ndarray] = (),
               image_urls: Sequence[str] = (), videos: Sequence[np.ndarray] = ()) -> list[object]:
        """`images`: uint8 [H, W, 3] pixel arrays of one size (the multimodal ensemble's image_bytes_input);
        `image_urls`: its image_url_input; `videos`: at most one (the ensemble's video_bytes_input takes one
        per request): uint8 frames [num_frames, H, W, 3] / [num_frames, 3, H, W], taken as 2 frames per
        second, or an encoded video as [1, 1, 1, num_bytes]."""
        if len(videos) > 1:
            raise ValueError(f"the ensemble takes one video per request (video_bytes_input), got {len(videos)}")
        values: list[tuple[str, str, np.ndarray]] = [
            ("text_input", "BYTES", np.array([[prompt.encode("utf-8")]], dtype=object)),
            ("max_tokens", "INT32", np.array([[sampling.max_tokens]], dtype=np.int32)),
            ("stream", "BOOL", np.array([[stream]], dtype=bool)),
            ("exclude_input_in_output", "BOOL", np.array([[True]], dtype=bool))]
        if sampling.temperature is not None:
            values.append(("temperature", "FP32", np.array([[sampling.temperature]], dtype=np.float32)))
        for name, value in (("top_k", sampling.top_k), ("min_tokens", sampling.min_tokens)):
            if value is not None:
                values.append((name, "INT32", np.array([[value]], dtype=np.int32)))
        if sampling.top_p is not None:
            values.append(("top_p", "FP32", np.array([[sampling.top_p]], dtype=np.float32)))
        if sampling.seed is not None:
            values.append(("seed", "UINT64", np.array([[sampling.seed]], dtype=np.uint64)))
        if sampling.stop:
            values.append(("stop_words", "BYTES", np.array([[s.encode() for s in sampling.stop]], dtype=object)))
        if sampling.guide is not None:              # TensorRT-LLM's guide type names
            kind, spec = sampling.guide
            values.append(("guided_decoding_guide_type", "BYTES", np.array([[TRITON_GUIDE_TYPES[kind].encode()]],
                                                                           dtype=object)))
            if kind != "json_object":
                values.append(("guided_decoding_guide", "BYTES", np.array([[spec.encode()]], dtype=object)))
        if len(images):
            pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])[None]
            values.append(("image_bytes_input", "UINT8", pixels))
        if image_urls:
            values.append(("image_url_input", "BYTES", np.array([[u.encode() for u in image_urls]], dtype=object)))
        if len(videos):
            values.append(("video_bytes_input", "UINT8", np.asarray(videos[0], dtype=np.uint8)[None]))
        tensors = []
        for name, datatype, array in values:
            tensor = self._grpc.InferInput(name, list(array.shape), datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        return tensors

    def stream(self, prompt: str, sampling: Sampling = Sampling(), stream: bool = True,
               images: Sequence[np.ndarray] = (), image_urls: Sequence[str] = (),
               videos: Sequence[np.ndarray] = ()) -> Iterator[str]:
        """Text deltas from ModelStreamInfer until the response flagged triton_final_response."""
        tensors = self.inputs(prompt, sampling, stream, images, image_urls, videos)
        results: queue.Queue[tuple[object, object]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            self.client.async_stream_infer(self.model, tensors, request_id=uuid.uuid4().hex)
            while True:
                result, error = results.get(timeout=self.timeout_s)
                if error is not None:
                    raise RuntimeError(str(error))
                text = result.as_numpy("text_output")  # type: ignore[attr-defined]
                if text is not None and text.size:
                    yield text.reshape(-1)[0].decode("utf-8")
                if result.get_response().parameters["triton_final_response"].bool_param:  # type: ignore[attr-defined]
                    return
        finally:
            self.client.stop_stream(cancel_requests=True)

    def generate(self, prompt: str, sampling: Sampling = Sampling(), images: Sequence[np.ndarray] = (),
                 image_urls: Sequence[str] = (), videos: Sequence[np.ndarray] = ()) -> str:
        return "".join(self.stream(prompt, sampling, stream=False, images=images, image_urls=image_urls,
                                   videos=videos))

    def ready(self) -> bool:
        return bool(self.client.is_server_ready())

    def models(self) -> list[tuple[str, str]]:
        """(name, state) of every model in the repository index."""
        index = self.client.get_model_repository_index()
        return [(m.name, m.state) for m in index.models]
