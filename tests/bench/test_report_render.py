"""trtserve-bench's text tables: a run interrupted before its first level ended (Ctrl-C early, as
test_bench.py::test_ctrl_c_writes_partial_results can do on a loaded machine) has no rows, and its table is
the header alone instead of a TypeError that lost the partial report."""
from __future__ import annotations

from bench.report import _render


def test_a_table_without_rows_is_its_header() -> None:
    assert _render(["conc", "out tok/s"], [], markdown=False) == "conc  out tok/s"
    assert _render(["conc", "out tok/s"], [["16", "1.5"]], markdown=False).splitlines() == \
        ["conc  out tok/s", "  16        1.5"]
    assert _render(["conc"], [], markdown=True) == "| conc |\n|---:|"
