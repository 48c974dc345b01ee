"""`make bench`: run the benchmarks, print ratios, and write docs/BENCHMARKS.md.

`python -m tests.benchmarks.run storage resume` runs only the named sections; the sections that did
not run (or failed) keep their previous text in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from rich.console import Console
from rich.table import Table

from tests.benchmarks import deploy, pipeline, resume, serving, storage

DOC = Path(__file__).resolve().parents[2] / "docs" / "BENCHMARKS.md"
# A hidden marker under each heading names its section, so renaming a title does not orphan its text.
KEY = re.compile(r"<!-- bench: (\w+) -->")
STAMP = "_Measured on "


@dataclass
class Section:
    name: str
    title: str
    ratio: str
    module: ModuleType
    note: str = ""


SECTIONS = [
    Section("pipeline", "make run on the demo data, cold pipeline cache", "target / value", pipeline),
    Section("serving", "serving: TGI-protocol server against a sequential generate loop (SmolLM2, float32, 32 new tokens)",
            "against sequential", serving),
    Section("deploy", "promotion: alias to endpoint (local mode)", "target / value", deploy),
    Section("storage", "storage: a merged-model directory to and from S3 (moto on loopback) against a local copy",
            "against copytree", storage,
            "`components.storage.upload_dir` / `download_dir` (boto3 multipart in 64 MiB parts, sha256 manifest "
            "written last and verified on download) for a directory shaped like a merged model: "
            f"{storage.WEIGHTS_BYTES // 2**20} MiB of random weights plus config and tokenizer JSON. The moto "
            "server runs in the benchmark's own process, so client and server share one interpreter: read the "
            "figures as a floor for a real S3 or MinIO endpoint. The round trip is compared byte for byte, and "
            "the benchmark fails if it differs."),
    Section("resume", "resume: SIGKILL at random steps, then restart (tiny Llama, QLoRA on CPU, one thread)",
            "against the uninterrupted run", resume,
            "A training run is killed with SIGKILL (no chance to save) at seeded random steps and started again "
            "with the same inputs, so it resumes from its last complete checkpoint. Steps lost = step reached − "
            "checkpoint resumed from, bounded by the checkpoint interval. Restart time runs from starting the "
            "process until it has finished the first step past that checkpoint; with tiny-model steps it is "
            "almost all process start-up (imports, model and checkpoint load), as for a fresh start."),
]
BY_NAME = {s.name: s for s in SECTIONS}


def table_for(section: Section, rows: list[tuple], stamp: str) -> tuple[Table, list[str]]:
    table = Table("measure", "value", "target", section.ratio, title=section.title)
    lines = [f"## {section.title}", "", f"<!-- bench: {section.name} -->",
             f"{STAMP}{stamp}; rerun alone with `python -m tests.benchmarks.run {section.name}`._", ""]
    if section.note:
        lines += [section.note, ""]
    lines += [f"| measure | value | target | {section.ratio} |", "|---|---|---|---|"]
    for row in rows:
        table.add_row(*row)
        lines.append("| " + " | ".join(row) + " |")
    return table, lines + [""]


def parse(text: str) -> tuple[list[str], list[tuple[str | None, str, list[str]]]]:
    """Split a BENCHMARKS.md into its preamble and (section name or None, title, lines) blocks at `## ` headings."""
    preamble: list[str] = []
    blocks: list[tuple[str | None, str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("## "):
            blocks.append((None, line[3:].strip(), [line]))
        elif blocks:
            blocks[-1][2].append(line)
        else:
            preamble.append(line)
    named = []
    for name, title, lines in blocks:
        found = next((m[1] for m in map(KEY.search, lines) if m), None)
        # Older files have no marker: fall back on the title a section is written with.
        name = found or next((s.name for s in SECTIONS if s.title == title), None)
        while lines and not lines[-1].strip():
            lines.pop()
        named.append((name, title, lines + [""]))
    return preamble, named


def undated_stamp(preamble: list[str]) -> str | None:
    """When and where sections without a stamp of their own were measured, from the old preamble."""
    for line in preamble:
        if m := re.match(r"Written by `make bench` on (.+?)\.?$", line):
            return m[1]
        if line.startswith("Sections without their own date"):
            return line.split(": ", 1)[1].rstrip(".")
    return None


def compose(fresh: dict[str, list[str]], old_text: str, everything: bool) -> str:
    preamble, blocks = parse(old_text)
    old = {name: lines for name, _, lines in blocks if name}
    body: list[str] = []
    for section in SECTIONS:
        body += fresh.get(section.name) or old.get(section.name, [])
    # A partial run must not lose text it cannot place; a full run defines the whole file.
    if not everything:
        for name, _, lines in blocks:
            if name not in BY_NAME:
                body += lines
    kept_undated = any(name not in fresh and not any(line.startswith(STAMP) for line in lines)
                       for name, _, lines in blocks if name in BY_NAME or not everything)
    head = ["# Benchmarks", "",
            "Written by `make bench`; `python -m tests.benchmarks.run NAME ...` reruns only the named sections ("
            + ", ".join(s.name for s in SECTIONS) + ") and keeps the others' text. Each section says when it ran.", ""]
    if kept_undated and (stamp := undated_stamp(preamble)):
        head += [f"Sections without their own date: {stamp}.", ""]
    return "\n".join(head + body).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", metavar="SECTION",
                        help="any of: " + ", ".join(BY_NAME) + " (default: all)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    chosen = [s for s in SECTIONS if not args.sections or s.name in args.sections]
    console = Console()
    stamp = f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU)"
    fresh: dict[str, list[str]] = {}
    failed: list[str] = []
    for section in chosen:
        console.rule(f"benchmark: {section.title}")
        try:
            table, lines = table_for(section, section.module.rows(section.module.measure()), stamp)
        except Exception:  # the other sections' figures are still worth writing
            console.print(traceback.format_exc(), markup=False, highlight=False)
            failed.append(section.name)
            continue
        console.print(table)
        fresh[section.name] = lines
    old_text = DOC.read_text() if DOC.exists() else ""
    DOC.write_text(compose(fresh, old_text, everything=not args.sections))
    console.print(f"wrote {DOC} ({', '.join(fresh) or 'no new figures'})")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)}; their previous text is kept")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
