"""PNG plots of benchmark reports: throughput and TTFT against concurrency, one line per run.

What it is for: `plot_reports` draws any number of reports (one file's runs or
`trtserve-bench plot a.json b.json ...`) in one figure: output tok/s (solid)
and total tok/s (dashed) on the left, TTFT p50 (solid) and p99 (dotted) on the
right, concurrency on a log2 axis. matplotlib (the `bench` extra) is imported
here only, with the non-interactive Agg backend.
Not for: tables (report.py).
"""
from __future__ import annotations

from pathlib import Path

from bench.report import BenchReport


def plot_reports(reports: list[tuple[str, BenchReport]], path: Path, title: str = "") -> Path:
    """Draw every run of every (name, report); the name prefixes the legend when there are several."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'trtserve[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    levels: set[int] = set()
    line = 0
    for name, report in reports:
        for run in report.runs:
            color = colors[line % len(colors)]
            line += 1
            label = f"{name}: {run.label}" if len(reports) > 1 else run.label
            conc = [x.concurrency for x in run.levels]
            levels.update(conc)
            left.plot(conc, [x.output_tok_s for x in run.levels], "o-", color=color, label=f"{label} output")
            left.plot(conc, [x.total_tok_s for x in run.levels], "s--", color=color, alpha=0.5,
                      label=f"{label} total")
            right.plot(conc, [x.ttft_ms.p50 for x in run.levels], "o-", color=color, label=f"{label} p50")
            right.plot(conc, [x.ttft_ms.p99 for x in run.levels], "^:", color=color, alpha=0.6,
                       label=f"{label} p99")
    for axis, ylabel in ((left, "tokens / s"), (right, "TTFT (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
        axis.set_xlabel("concurrency (closed-loop clients)")
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7)
    left.set_title("throughput")
    right.set_title("time to first token")
    figure.suptitle(title or "trtserve-bench", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
