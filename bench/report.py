"""The benchmark's outputs: a text table, a markdown table, and the JSON record (schema `trtserve-bench/1`).

What it is for: `RunResult` (one system's levels: trtserve over one protocol, or
the HF baseline) and `BenchReport` (meta + runs), with `to_json` / `load_report`
kept symmetric so that `trtserve-bench plot` reads what a run wrote, and
`text_tables` / `markdown_tables` (one table per run, then the side-by-side
output tok/s and TTFT with the ratio to the baseline).
Not for: drawing (plot.py) or measuring (loadgen.py, summary.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.summary import LevelSummary

SCHEMA = "trtserve-bench/1"
LEVEL_COLUMNS = ("conc", "ok", "err", "out tok/s", "total tok/s", "QPS", "TTFT p50 ms", "TTFT p99 ms",
                 "TPOT p50 ms", "TPOT p99 ms", "E2E p50 s", "E2E p99 s", "prefix hit")


@dataclass(slots=True)
class RunResult:
    system: str                         # "trtserve" or "hf-transformers"
    protocol: str | None                # "native" / "triton" for trtserve
    counts: dict[str, object]           # how every count and time was obtained
    levels: list[LevelSummary] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.system} {self.protocol}" if self.protocol else self.system

    def to_json(self) -> dict[str, object]:
        return {"system": self.system, "protocol": self.protocol, "label": self.label, "counts": self.counts,
                "levels": [level.to_json() for level in self.levels]}


@dataclass(slots=True)
class BenchReport:
    meta: dict[str, object]
    runs: list[RunResult] = field(default_factory=list)
    partial: bool = False

    @property
    def baseline(self) -> RunResult | None:
        return next((r for r in self.runs if r.system != "trtserve"), None)

    def to_json(self) -> dict[str, object]:
        return {"schema": SCHEMA, "partial": self.partial, "meta": self.meta,
                "runs": [run.to_json() for run in self.runs]}

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")


def load_report(path: Path) -> BenchReport:
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a trtserve-bench report (schema {data.get('schema')!r}, want {SCHEMA!r})")
    runs = [RunResult(r["system"], r["protocol"], r["counts"], [LevelSummary.from_json(x) for x in r["levels"]])
            for r in data["runs"]]
    return BenchReport(data["meta"], runs, data["partial"])


def _num(value: float | None, digits: int = 1, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def level_row(level: LevelSummary) -> list[str]:
    hit = "-" if level.prefix_cache_hit_rate is None else f"{level.prefix_cache_hit_rate:.1%}"
    return [f"{level.concurrency}{'*' if level.partial else ''}", str(level.num_requests), str(level.num_errors),
            _num(level.output_tok_s), _num(level.total_tok_s), _num(level.qps, 2),
            _num(level.ttft_ms.p50), _num(level.ttft_ms.p99), _num(level.tpot_ms.p50, 2), _num(level.tpot_ms.p99, 2),
            _num(level.e2e_ms.p50, 2, 1e-3), _num(level.e2e_ms.p99, 2, 1e-3), hit]


def comparison(report: BenchReport) -> tuple[list[str], list[list[str]]] | None:
    """conc | each trtserve run's out tok/s and ratio to the baseline | baseline tok/s | TTFT p50 of each."""
    base = report.baseline
    ours = [r for r in report.runs if r.system == "trtserve"]
    if base is None or not ours:
        return None
    by_conc = {level.concurrency: level for level in base.levels}
    header = ["conc"] + [f"{r.label} out tok/s" for r in ours] + [f"{base.label} out tok/s"] + \
        [f"ratio {r.protocol}" for r in ours] + [f"TTFT p50 ms {r.label}" for r in ours + [base]]
    rows = []
    for level in ours[0].levels:
        c = level.concurrency
        mine = [next((x for x in r.levels if x.concurrency == c), None) for r in ours]
        theirs = by_conc.get(c)
        ratios = [_num(m.output_tok_s / theirs.output_tok_s, 2) if m and theirs and theirs.output_tok_s else "-"
                  for m in mine]
        rows.append([str(c)] + [_num(m.output_tok_s) if m else "-" for m in mine] +
                    [_num(theirs.output_tok_s) if theirs else "-"] + ratios +
                    [_num(x.ttft_ms.p50) if x else "-" for x in mine + [theirs]])
    return header, rows


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    # max over a list: a run interrupted before its first level ends has no rows (then the header alone)
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(len(header))]
    fmt: Callable[[list[str]], str] = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header)] + [fmt(row) for row in rows])


def tables(report: BenchReport, markdown: bool = False) -> str:
    parts = []
    for run in report.runs:
        title = f"{run.label}: {report.meta.get('workload_label', '')}"
        parts.append(("### " if markdown else "== ") + title)
        parts.append(_render(list(LEVEL_COLUMNS), [level_row(x) for x in run.levels], markdown))
    side_by_side = comparison(report)
    if side_by_side is not None:
        parts.append(("### " if markdown else "== ") + "side by side (ratio = trtserve / baseline output tok/s)")
        parts.append(_render(*side_by_side, markdown))
    if report.partial:
        parts.append("(partial: interrupted; levels marked * did not finish)")
    return "\n\n".join(parts) + "\n"
