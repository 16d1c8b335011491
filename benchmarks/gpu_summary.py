"""One summary table over trtserve-bench records (the last step of benchmarks/gpu_suite.sh).

What it is for: per model and concurrency level, trtserve's output tok/s, TPOT p50 and end-to-end
p50 beside HF's output tok/s, their ratio, and the issue-15 targets where one applies (Qwen2.5-0.5B
shape: TPOT p50 at c=1 <= 2.5 ms, output tok/s at c=32 >= 15k; every level >= 5x HF; Qwen2-VL-2B
shape with one image at c=1: end-to-end p50 <= 0.35 s). Reads the JSON files trtserve-bench writes.
Not for: measuring (trtserve-bench) or plotting (trtserve-bench plot).

    python benchmarks/gpu_summary.py docs/perf/bench_*_gpu_*.json [--markdown]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

MIN_RATIO_VS_HF = 5.0


@dataclass(frozen=True, slots=True)
class Row:
    model: str
    workload: str
    concurrency: int
    tok_s: float | None
    tpot_ms: float | None
    e2e_s: float | None
    hf_tok_s: float | None

    @property
    def ratio(self) -> float | None:
        return self.tok_s / self.hf_tok_s if self.tok_s and self.hf_tok_s else None

    def targets(self) -> list[str]:
        """Each applicable target as 'name: ok' or 'name: MISS'."""
        checks: list[tuple[str, bool]] = []
        if self.ratio is not None:
            checks.append((f">={MIN_RATIO_VS_HF:g}x HF", self.ratio >= MIN_RATIO_VS_HF))
        if self.model.startswith("qwen2.5-0.5b") and self.concurrency == 1 and self.tpot_ms is not None:
            checks.append(("TPOT<=2.5ms", self.tpot_ms <= 2.5))
        if self.model.startswith("qwen2.5-0.5b") and self.concurrency == 32 and self.tok_s is not None:
            checks.append(("tok/s>=15k", self.tok_s >= 15000))
        if self.model.startswith("qwen2-vl-2b") and self.concurrency == 1 and self.e2e_s is not None:
            checks.append(("E2E<=0.35s", self.e2e_s <= 0.35))
        return [f"{name}: {'ok' if passed else 'MISS'}" for name, passed in checks]


def rows_of(report: dict) -> list[Row]:
    meta = report["meta"]
    model = meta["model"]["name"]
    workload = meta.get("workload_label", "")
    hf = {level["concurrency"]: level for run in report["runs"] if run["system"] != "trtserve"
          for level in run["levels"]}
    rows = []
    for run in report["runs"]:
        if run["system"] != "trtserve" or run.get("protocol") not in (None, "native"):
            continue
        for level in run["levels"]:
            c = level["concurrency"]
            e2e = level["e2e_ms"]["p50"]
            rows.append(Row(model, workload, c, level["output_tok_s"], level["tpot_ms"]["p50"],
                            e2e / 1000 if e2e is not None else None,
                            hf[c]["output_tok_s"] if c in hf else None))
    return rows


def render(rows: list[Row], markdown: bool) -> str:
    header = ["model", "workload", "c", "trtserve tok/s", "TPOT p50 ms", "E2E p50 s", "HF tok/s", "x HF",
              "targets"]

    def num(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    body = [[r.model, r.workload, str(r.concurrency), num(r.tok_s, 0), num(r.tpot_ms, 2), num(r.e2e_s, 3),
             num(r.hf_tok_s, 0), num(r.ratio, 2), "; ".join(r.targets())] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
    widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("records", nargs="+", type=Path, help="trtserve-bench JSON files")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for path in args.records:
        rows += rows_of(json.loads(path.read_text()))
    rows.sort(key=lambda r: (r.model, r.workload, r.concurrency))
    print(render(rows, args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
