"""What `llmops run` shows while kfp.local runs the stages: each stage's own lines, not kfp's plumbing.

kfp.local (2.17) runs every task as a subprocess, prints its output through an indenting `print`, and logs its own
progress. Unfiltered, the demo run printed about 1,000 lines, most of them the executor's input JSON, each task's
output listing and library progress bars. `quiet_kfp` keeps kfp's task headings and verdicts and the stages' own
lines, and drops the rest; `llmops run --verbose` shows everything.
"""

from __future__ import annotations

import io
import logging
import os
import re
import sys
from contextlib import contextmanager

from components.environment import QUIET_RUN

# kfp's executor and library noise inside a task's output (each line arrives indented by kfp.local).
NOISE = re.compile(
    r"\[KFP Executor "  # the executor's own log lines
    r"|^\s*-{20,}\s*$"  # kfp.local's separators
    r"|\d+%\|"  # tqdm bars (transformers' weight loading and shard writing)
    r"|^\s*\d{4}/\d\d/\d\d \d\d:\d\d:\d\d INFO mlflow"  # MLflow's store set-up chatter
    r"|\[transformers\] (The following layers were not sharded|mtime may not be reliable)"  # known, harmless
)
# A library's Python warning: its line, then the indented source line it quotes.
LIBRARY_WARNING = re.compile(r"/site-packages/\S+:\d+: \w*Warning:")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
EXECUTOR_INPUT = "Got executor_input:"
# kfp.local's own log records that repeat what the stages say, or list their artifacts.
QUIET_RECORDS = re.compile(r"Streamed logs|' outputs:|has no outputs|Cleaned up workspace")
# Rich lays out for this width when a stage's output is a pipe, so its lines are never rewrapped mid-number.
PIPE_WIDTH = "160"


class _TaskLines(io.TextIOBase):
    """A stdout that passes a task's own lines and drops kfp's executor input JSON and the noise above."""

    def __init__(self, stream):
        self.stream, self.pending, self.json_until, self.last_blank = stream, "", None, False
        self.quoted_by = None  # the indentation of a library warning whose quoted source line comes next

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            if self._keep(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def _keep(self, line: str) -> bool:
        if self.json_until is not None:  # inside the input JSON: it ends at the brace that opened it
            if self.json_until == "":
                self.json_until = line[: len(line) - len(line.lstrip())] + "}"
            elif line.rstrip() == self.json_until:
                self.json_until = None
            return False
        if EXECUTOR_INPUT in line:
            self.json_until = ""
            return False
        if self.quoted_by is not None:
            quoted, self.quoted_by = len(line) - len(line.lstrip()) > self.quoted_by, None
            if quoted:
                return False
        if LIBRARY_WARNING.search(line):
            self.quoted_by = len(line) - len(line.lstrip())
            return False
        if NOISE.search(line):
            return False
        blank = not line.strip()
        keep, self.last_blank = not (blank and self.last_blank), blank  # one blank line between tasks, not three
        return keep


class _QuietRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not QUIET_RECORDS.search(ANSI.sub("", record.getMessage()))


@contextmanager
def quiet_kfp(verbose: bool = False):
    """While kfp.local runs: stage output passes, kfp's plumbing does not (unless verbose)."""
    os.environ.setdefault("COLUMNS", PIPE_WIDTH)  # inherited by every task's subprocess
    for name, value in QUIET_RUN.items():  # no progress bars of the Hub's; the summary links the MLflow run itself
        os.environ.setdefault(name, value)
    if verbose:
        yield
        return
    root, records, stdout = logging.getLogger(), _QuietRecords(), sys.stdout
    root.addFilter(records)
    sys.stdout = _TaskLines(stdout)
    try:
        yield
    finally:
        sys.stdout.write("\n")
        sys.stdout = stdout
        root.removeFilter(records)
