"""Start `trtserve-serve` as a child process on free ports and talk to it: for the demo, scripts and tests.

What it is for: `ServerProcess.start(args)` runs the server with `--port 0
--metrics-port 0` on 127.0.0.1, reads the ports from its "listening" line,
waits for "ready", and later stops it with SIGTERM (returning the exit code);
`metric_value` reads one sample from the Prometheus text it serves.
Not for: production process management (use systemd / Kubernetes).
"""
from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from prometheus_client.parser import text_string_to_metric_families

LISTENING = re.compile(r"listening on ([\d.]+):(\d+) \(gRPC\), metrics (?:on [\d.]+:(\d+)/metrics|off)")
HTTP_LISTENING = re.compile(r"OpenAI HTTP on [\d.]+:(\d+)")
START_TIMEOUT_S = 120.0
EOF_LINE = "<eof>"


@dataclass
class ServerProcess:
    process: subprocess.Popen
    log_path: Path | None
    port: int = 0
    metrics_port: int = 0
    http_port: int = 0                 # 0: the OpenAI-compatible HTTP API is off
    lines: queue.Queue[str] = field(default_factory=queue.Queue)

    @classmethod
    def start(cls, args: list[str], log_dir: Path | None = None, env: dict[str, str] | None = None,
              wait_ready: bool = True, own_group: bool = False) -> ServerProcess:
        """Run the server; its stderr goes to a log file in `log_dir` (or to ours when None).

        `own_group`: start it in a process group of its own, so a Ctrl-C at the terminal reaches only us and
        we decide when the server stops (the benchmark prints its partial results first). A group, not a new
        session: Linux's autogroup scheduler shares the CPU between sessions, so a server in a session of its
        own gets only its session's half of cores it shares with the benchmark's client, and each wakeup of the
        client preempts it. Served tiny-qwen2 32/128 c=16, 2 cores, 2 alternating pairs: a server started in
        its own session 12326 / 11797 tok/s, in the client's 15057 / 16196 (docs/perf/2026-11-30/session5).
        """
        log_path: Path | None = None
        stderr: IO[str] | None = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            log_path = log_dir / f"server-{time.monotonic_ns()}.log"
            stderr = log_path.open("w")
        command = [sys.executable, "-m", "grpc_service.server_cli", "--host", "127.0.0.1", "--port", "0",
                   "--metrics-port", "0", "--http-port", "0", *args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, **(env or {})},
                                   process_group=0 if own_group else None)
        server = cls(process, log_path)
        threading.Thread(target=server._read_stdout, daemon=True).start()
        line = server.wait_for("listening")
        match = LISTENING.search(line)
        if match is None:
            raise RuntimeError("unexpected 'listening' line from trtserve-serve")
        server.port = int(match.group(2))
        server.metrics_port = int(match.group(3) or 0)
        http = HTTP_LISTENING.search(line)
        server.http_port = int(http.group(1)) if http else 0
        if wait_ready:
            server.wait_for("ready")
        return server

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(EOF_LINE)

    def wait_for(self, word: str, timeout: float = START_TIMEOUT_S) -> str:
        """The first stdout line containing `word`; raises if the server exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"trtserve-serve did not print {word!r} within {timeout} s\n{self.log()}") from None
            if line == EOF_LINE:
                raise RuntimeError(f"trtserve-serve exited before printing {word!r}\n{self.log()}")
            if word in line:
                return line

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def http_url(self) -> str:
        """Base URL of the OpenAI-compatible API (an OpenAI client's base_url is this + "/v1")."""
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path is not None else ""

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        try:
            self.terminate(30.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0.0 when absent). `name` is the sample name (with _total etc.)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0
