"""What the benchmark sends: sessions of one or more turns, built once per concurrency level.

What it is for: `WorkloadSpec` (the CLI's workload flags) and `build_sessions`,
which makes fresh prompts for each level (so no level is served from the prefix
cache that an earlier level filled, except the shared prefix, on purpose):
* `synthetic`: random prompts of an exact token length (`input_len`, a value
  or a range), optionally with synthetic images;
* `shared-prefix`: one long common prefix plus short unique suffixes;
* `jsonl`: a docvqa / LLaVA-style file (`conversations` of human / gpt turns,
  `image` or `images` file names resolved under an image folder).
`num_turns` > 1 makes multi-turn sessions: each turn resends the history
(loadgen.py composes it from the previous prompt and the server's answer).
`output_len` may be a range (`16:256`): each request's length is drawn uniformly
from a random stream of its own, seeded by the seed and the level only, so the
same seed gives every system (trtserve, the HF baseline, another server with
another tokenizer) the same lengths in the same order.
Not for: sending (backends.py) or timing (loadgen.py).
"""
from __future__ import annotations

import io
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from bench.backends import BenchRequest
from bench.tokens import ExactPrompt, Tokenizer, exact_prompt

KINDS = ("synthetic", "shared-prefix", "jsonl")
IMAGE_PLACEHOLDER = re.compile(r"<image>\s*")


@dataclass(frozen=True, slots=True)
class IntRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str, name: str) -> IntRange:
        """'128' or '64:256' (inclusive, uniform)."""
        try:
            parts = [int(p) for p in text.split(":")]
        except ValueError:
            raise ValueError(f"{name}: expected N or LOW:HIGH, got {text!r}") from None
        if len(parts) not in (1, 2) or min(parts) < 0 or parts[-1] < parts[0]:
            raise ValueError(f"{name}: expected N or LOW:HIGH with 0 <= LOW <= HIGH, got {text!r}")
        return cls(parts[0], parts[-1])

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True, slots=True)
class Session:
    turns: tuple[BenchRequest, ...]     # each turn's new part only


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    kind: str = "synthetic"
    input_len: IntRange = IntRange(128, 128)
    output_len: IntRange = IntRange(64, 64)
    prefix_len: int = 0                          # shared-prefix only
    num_turns: int = 1
    jsonl: Path | None = None
    image_dir: Path | None = None
    images_per_request: IntRange = IntRange(0, 0)
    image_size: int = 448                        # synthetic images (no JSONL)
    seed: int = 0

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "input_len": str(self.input_len), "output_len": str(self.output_len),
                "prefix_len": self.prefix_len if self.kind == "shared-prefix" else None, "num_turns": self.num_turns,
                "jsonl": str(self.jsonl) if self.jsonl else None,
                "image_dir": str(self.image_dir) if self.image_dir else None,
                "images_per_request": str(self.images_per_request), "seed": self.seed}

    def label(self) -> str:
        parts = [self.kind if self.kind != "jsonl" else f"jsonl:{self.jsonl.name if self.jsonl else ''}"]
        if self.kind != "jsonl":
            parts.append(f"in={self.input_len}")
        if self.kind == "shared-prefix":
            parts.append(f"prefix={self.prefix_len}")
        parts.append(f"out={self.output_len}")
        if self.images_per_request.high:
            parts.append(f"img={self.images_per_request}")
        if self.num_turns > 1:
            parts.append(f"turns={self.num_turns}")
        return " ".join(parts)


class WorkloadBuilder:
    """Builds sessions for one run; `sessions(level, n)` gives n turns' worth, different for each level."""

    def __init__(self, spec: WorkloadSpec, tokenizer: Tokenizer) -> None:
        if spec.kind not in KINDS:
            raise ValueError(f"--workload must be one of {KINDS}, got {spec.kind!r}")
        if spec.num_turns < 1:
            raise ValueError(f"--multi-turn must be >= 1, got {spec.num_turns}")
        self.spec = spec
        self.tokenizer = tokenizer
        self._prefix: ExactPrompt | None = None
        if spec.kind == "shared-prefix":
            if spec.prefix_len < 1:
                raise ValueError("--prefix-len must be >= 1 for the shared-prefix workload")
            self._prefix = exact_prompt(tokenizer, spec.prefix_len, random.Random(f"{spec.seed}-prefix"))
        self._records = load_jsonl(spec.jsonl) if spec.kind == "jsonl" else []
        self._image_names = _image_names(spec.image_dir) if spec.image_dir else []

    def sessions(self, level: str, num_requests: int) -> list[Session]:
        """Sessions holding `num_requests` turns in all (the last session may be shorter)."""
        rng = random.Random(f"{self.spec.seed}-{level}")
        lengths = output_lens(self.spec, level, num_requests)
        sessions: list[Session] = []
        remaining = num_requests
        while remaining > 0:
            num_turns = min(self.spec.num_turns, remaining)
            first = num_requests - remaining
            sessions.append(self._session(rng, lengths[first:first + num_turns]))
            remaining -= num_turns
        return sessions

    def _session(self, rng: random.Random, output_lens: list[int]) -> Session:
        if self.spec.kind == "jsonl":
            record = rng.choice(self._records)
            texts = _cycle(record.user_texts, len(output_lens))
            first_images = self._images(rng, record.image_names)
            turns = [self._text_turn(text, n, first_images if i == 0 else ())
                     for i, (text, n) in enumerate(zip(texts, output_lens))]
            return Session(tuple(turns))
        turns = []
        for i, output_len in enumerate(output_lens):
            prefix = self._prefix if i == 0 else None
            prompt = exact_prompt(self.tokenizer, self.spec.input_len.sample(rng), rng, prefix)
            images = self._images(rng, ()) if i == 0 else ()
            turns.append(BenchRequest(prompt.text, prompt.token_ids, output_len, images))
        return Session(tuple(turns))

    def _text_turn(self, text: str, output_len: int, images: tuple[bytes, ...]) -> BenchRequest:
        return BenchRequest(text, tuple(self.tokenizer.encode(text)), output_len, images)

    def _images(self, rng: random.Random, wanted: tuple[str, ...]) -> tuple[bytes, ...]:
        """The record's images, topped up from the folder (or synthetic) or cut to the sampled count."""
        count = self.spec.images_per_request.sample(rng)
        names = list(wanted[:count])
        pool = self._image_names
        while len(names) < count and pool:
            names.append(rng.choice(pool))
        images = [self._read_image(name) for name in names]
        while len(images) < count:
            images.append(synthetic_image(rng, self.spec.image_size))
        return tuple(images)

    def _read_image(self, name: str) -> bytes:
        if self.spec.image_dir is None:
            raise ValueError(f"image {name!r} named in {self.spec.jsonl}: give --image-dir")
        path = self.spec.image_dir / name
        if not path.is_file():
            raise ValueError(f"image {name!r} named in {self.spec.jsonl} is not in {self.spec.image_dir}")
        return path.read_bytes()


def output_lens(spec: WorkloadSpec, level: str, num_requests: int) -> list[int]:
    """The output length of each of a level's requests, in sending order: uniform over `spec.output_len`,
    from a stream seeded by the seed and the level alone (prompts, images and the tokenizer do not touch it)."""
    rng = random.Random(f"{spec.seed}-{level}-output-len")
    return [spec.output_len.sample(rng) for _ in range(num_requests)]


@dataclass(frozen=True, slots=True)
class JsonlRecord:
    user_texts: tuple[str, ...]
    image_names: tuple[str, ...]


def load_jsonl(path: Path | None) -> list[JsonlRecord]:
    """Records with `conversations` ([{from: human|gpt, value}] or [{role, content}]) and `image` / `images`."""
    if path is None:
        raise ValueError("--workload jsonl needs --jsonl FILE")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: invalid JSON ({exc.msg})") from None
        texts = tuple(_user_texts(row))
        if not texts:
            raise ValueError(f"{path}:{number}: no human / user turn in 'conversations' (or 'prompt')")
        images = row.get("images", row.get("image", []))
        images = (images,) if isinstance(images, str) else tuple(images)
        records.append(JsonlRecord(texts, images))
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def _user_texts(row: dict) -> list[str]:
    turns = row.get("conversations") or row.get("messages") or []
    texts = [str(t.get("value", t.get("content", ""))) for t in turns
             if t.get("from", t.get("role")) in ("human", "user")]
    if not texts and "prompt" in row:
        texts = [str(row["prompt"])]
    return [IMAGE_PLACEHOLDER.sub("", t).strip() for t in texts]


def _cycle(items: tuple[str, ...], count: int) -> list[str]:
    return [items[i % len(items)] for i in range(count)]


def _image_names(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise ValueError(f"--image-dir {folder} is not a directory")
    return sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))


def synthetic_image(rng: random.Random, size: int) -> bytes:
    """A PNG of random blocks (cheap to make, not trivially compressible)."""
    from PIL import Image

    cells = 8
    image = Image.new("RGB", (cells, cells))
    image.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(cells * cells)])
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()
