"""Stage-by-stage progress on stderr for long builds.

What it is for: telling the person at the terminal which stage runs, how long
each took, and why a stage was skipped. Not for: logging inside libraries.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class Progress:
    def __init__(self, num_stages: int, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.num_stages = num_stages
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.index = 0

    def _print(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.index += 1
        self._print(f"[{self.index}/{self.num_stages}] {name} ...")
        start = time.monotonic()
        yield
        self._print(f"[{self.index}/{self.num_stages}] {name}: done in {time.monotonic() - start:.1f} s")

    def skip(self, name: str, reason: str) -> None:
        self.index += 1
        self._print(f"[{self.index}/{self.num_stages}] {name}: skipped ({reason})")

    def note(self, text: str) -> None:
        self._print(f"      {text}")
