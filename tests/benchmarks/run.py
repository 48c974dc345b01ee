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

from tests.benchmarks import (
    banking77_run,
    deploy,
    engines,
    evaluation,
    limits,
    memory_plan,
    merge_fidelity,
    pipeline,
    quantization,
    registry,
    resume,
    serving,
    soak,
    storage,
    time_to_quality,
    training,
)

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
    Section(
        "serving",
        "serving: llmops serve (continuous batching) against a sequential generate loop (SmolLM2, 32 new tokens)",
        "against sequential",
        serving,
        "The server is its own `llmops serve` process on every core but the last; the load generator streams "
        "from the last core. The baseline is a one-at-a-time `model.generate` loop on the server's cores with the "
        "same dtype, threads and prompts, run first. Every figure is the median of 3 runs. Closed loop: each "
        "client sends its next request when its last is answered. ContinuousBatchingManager runs in-process "
        "(no HTTP) on the server's cores, with sdpa attention and 64-token pages.",
    ),
    Section(
        "engines",
        "engines: our server against real vLLM 0.32 on CPU, same cores, prompts and load (SmolLM2-135M-Instruct)",
        "vLLM / ours",
        engines,
        engines.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section("deploy", "promotion: alias to endpoint (local mode)", "target / value", deploy),
    Section(
        "soak",
        "soak: mixed load for 10 minutes through a promotion, a deployer restart and a rollback (local, SmolLM2)",
        "against the target",
        soak,
        soak.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section(
        "registry",
        "registry: pyfunc load time and fetch_model's verification overhead (SmolLM2)",
        "against the download",
        registry,
        "The version is logged as the register stage logs it (a pyfunc around the merged directory, with its "
        "sha256 manifest). load_model includes downloading from a loopback MLflow server and loading the "
        "weights in float32; verification hashes every served file and checks the manifest's own digest.",
    ),
    Section(
        "storage",
        "storage: a merged-model directory to and from S3 (moto on loopback) against a local copy",
        "against copytree",
        storage,
        "`components.storage.upload_dir` / `download_dir` (boto3 multipart in 64 MiB parts, sha256 manifest "
        "written last and verified on download) for a directory shaped like a merged model: "
        f"{storage.WEIGHTS_BYTES // 2**20} MiB of random weights plus config and tokenizer JSON. The moto "
        "server runs in the benchmark's own process, so client and server share one interpreter: read the "
        "figures as a floor for a real S3 or MinIO endpoint. The round trip is compared byte for byte, and "
        "the benchmark fails if it differs.",
    ),
    Section(
        "resume",
        "resume: SIGKILL at random steps, then restart (tiny Llama, QLoRA on CPU, one thread)",
        "against the uninterrupted run",
        resume,
        "A training run is killed with SIGKILL (no chance to save) at seeded random steps and started again "
        "with the same inputs, so it resumes from its last complete checkpoint. Steps lost = step reached − "
        "checkpoint resumed from, bounded by the checkpoint interval. Restart time runs from starting the "
        "process until it has finished the first step past that checkpoint; with tiny-model steps it is "
        "almost all process start-up (imports, model and checkpoint load), as for a fresh start.",
    ),
    Section(
        "evaluation",
        "evaluation: batched generate against the recipe's one-at-a-time loop (SmolLM2, BANKING77)",
        "against the recipe",
        evaluation,
        "Both sides in one process with the same weights, dtype and max_new_tokens, alternating over the "
        "repeats. The predictions are compared: batching must not change the answers.",
    ),
    Section(
        "quantization",
        "quantization: 16-bit against int8 and NF4 (size, memory, exact match, perplexity)",
        "against 16-bit",
        quantization,
        quantization.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section(
        "merge",
        "merge fidelity: which merge reproduces the trained QLoRA model (SmolLM2, BANKING77)",
        "against the trained model",
        merge_fidelity,
        merge_fidelity.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section(
        "memory_plan",
        "plan vs measured: each stage's planned peak memory against its measured peak RSS (SmolLM2, CPU)",
        "planned / measured",
        memory_plan,
        memory_plan.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section(
        "limits",
        "limits: measured matmul peak and training's model FLOPs utilization",
        "against fp32 peak",
        limits,
        "MFU = 6·N·tokens/s ÷ measured bf16 matmul peak (dense forward+backward, N = total parameters, "
        "non-padding tokens). It leaves out attention FLOPs and NF4 dequantization, so it compares runs "
        "rather than bounds them.",
    ),
    Section(
        "training",
        "training: our train stage against the notebook recipe (QLoRA, SmolLM2, BANKING77)",
        "against the recipe",
        training,
        training.NOTE,
    ),
    Section(
        "quality",
        "time to quality: BANKING77 to 90% held-out accuracy in 45 minutes on this machine (profile banking77)",
        "against the target",
        time_to_quality,
        time_to_quality.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
    Section(
        "banking77",
        "the README's BANKING77 command end to end: whole-run time, accuracy, the later stages, peak memory",
        "against the target",
        banking77_run,
        banking77_run.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
    ),
]
BY_NAME = {s.name: s for s in SECTIONS}


def table_for(section: Section, rows: list[tuple], stamp: str) -> tuple[Table, list[str]]:
    table = Table("measure", "value", "target", section.ratio, title=section.title)
    lines = [
        f"## {section.title}",
        "",
        f"<!-- bench: {section.name} -->",
        f"{STAMP}{stamp}; rerun alone with `python -m tests.benchmarks.run {section.name}`._",
        "",
    ]
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
    kept_undated = any(
        name not in fresh and not any(line.startswith(STAMP) for line in lines)
        for name, _, lines in blocks
        if name in BY_NAME or not everything
    )
    head = [
        "# Benchmarks",
        "",
        "Written by `make bench`; `python -m tests.benchmarks.run NAME ...` reruns only the named sections ("
        + ", ".join(s.name for s in SECTIONS)
        + ") and keeps the others' text. Each section says when it ran.",
        "",
    ]
    if kept_undated and (stamp := undated_stamp(preamble)):
        head += [f"Sections without their own date: {stamp}.", ""]
    return "\n".join(head + body).rstrip("\n") + "\n"


def _slug(text: str) -> str:
    return re.sub(r"[^\w\-./]+", "_", text, flags=re.ASCII).strip("_")[:200]


def _number(text: str) -> float | None:
    """The value of a cell that holds one number ("2.07x", "1,234", "45.1%"), else None."""
    m = re.fullmatch(r"\s*([+-]?\d[\d,]*(?:\.\d+)?)\s*(x|%)?\s*", text)
    if not m:
        return None
    value = float(m[1].replace(",", ""))
    return value / 100 if m[2] == "%" else value


def log_to_mlflow(fresh: dict[str, list[tuple]], stamp: str) -> str | None:
    """With MLFLOW_TRACKING_URI set, one run named "bench": numeric cells as metrics, the others as params,
    and each section's table as a JSON artifact. A no-op without a tracking URI."""
    if not os.environ.get("MLFLOW_TRACKING_URI") or not fresh:
        return None
    import mlflow

    mlflow.set_experiment(os.environ.get("LLMOPS_BENCH_EXPERIMENT", "llmops-bench"))
    with mlflow.start_run(
        run_name="bench", tags={"llmops.bench.sections": ",".join(fresh), "llmops.bench.measured": stamp}
    ) as run:
        for name, table in fresh.items():
            metrics, params, seen = {}, {}, set()
            for i, (measure, value, target, ratio) in enumerate(table):
                key = f"{name}.{_slug(measure)}"
                key = key if key not in seen else f"{key}.{i}"
                seen.add(key)
                if (v := _number(value)) is not None:
                    metrics[key] = v
                elif value:
                    params[key] = value[:500]
                if (r := _number(ratio)) is not None:
                    metrics[f"{key}.ratio"] = r
                if target:
                    params[f"{key}.target"] = target[:500]
            mlflow.log_metrics(metrics)
            if params:
                mlflow.log_params(params)
            mlflow.log_dict(
                {
                    "section": name,
                    "columns": ["measure", "value", "target", "ratio"],
                    "rows": [list(row) for row in table],
                },
                f"bench/{name}.json",
            )
        return f"{mlflow.get_tracking_uri()} run {run.info.run_id}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument(
        "sections", nargs="*", metavar="SECTION", help="any of: " + ", ".join(BY_NAME) + " (default: all)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections if name not in BY_NAME]
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
    chosen = [s for s in SECTIONS if not args.sections or s.name in args.sections]
    console = Console()
    stamp = f"{datetime.date.today()} ({platform.machine()}, {os.cpu_count()} CPU cores, no GPU)"
    fresh: dict[str, list[str]] = {}
    measured: dict[str, list[tuple]] = {}
    failed: list[str] = []
    for section in chosen:
        console.rule(f"benchmark: {section.title}")
        try:
            measured[section.name] = section.module.rows(section.module.measure())
            table, lines = table_for(section, measured[section.name], stamp)
        except Exception:  # the other sections' figures are still worth writing
            console.print(traceback.format_exc(), markup=False, highlight=False)
            failed.append(section.name)
            continue
        console.print(table)
        fresh[section.name] = lines
    old_text = DOC.read_text() if DOC.exists() else ""
    DOC.write_text(compose(fresh, old_text, everything=not args.sections))
    console.print(f"wrote {DOC} ({', '.join(fresh) or 'no new figures'})")
    try:
        if where := log_to_mlflow({name: measured[name] for name in fresh}, stamp):
            console.print(f"logged to MLflow: {where}")
    except Exception:  # the figures are in the file already; say the logging failed and fail the command
        console.print(traceback.format_exc(), markup=False, highlight=False)
        failed.append("logging to MLflow")
    if failed:
        console.print(f"[red]failed: {', '.join(failed)} (a failed section keeps its previous text)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
