"""`make bench`: run the benchmarks, print ratios, and write docs/BENCHMARKS.md (and to MLflow when configured)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.benchmarks import deploy, pipeline, serving

DOC = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"


SECTIONS = [
    ("make run on the demo data, cold pipeline cache", "target / value", pipeline),
    ("serving: TGI-protocol server against a sequential generate loop (SmolLM2, float32, 32 new tokens)",
     "against sequential", serving),
    ("promotion: alias to endpoint (local mode)", "target / value", deploy),
]


def table_for(title: str, ratio: str, rows: list[tuple]) -> tuple[Table, list[str]]:
    table = Table("measure", "value", "target", ratio, title=title)
    lines = [f"## {title}", "", f"| measure | value | target | {ratio} |", "|---|---|---|---|"]
    for row in rows:
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    return table, lines + [""]


def main() -> None:
    console = Console()
    doc = ["# Benchmarks", "", f"Written by `make bench` on {datetime.date.today()} ({platform.machine()}, "
           f"{os.cpu_count()} CPU cores, no GPU).", ""]
    for title, ratio, module in SECTIONS:
        console.rule(f"benchmark: {title}")
        table, lines = table_for(title, ratio, module.rows(module.measure()))
        console.print(table)
        doc += lines
    DOC.write_text("\n".join(doc))
    console.print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
