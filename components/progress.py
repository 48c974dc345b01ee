"""A stage's live progress: a bar on a terminal, plain lines at a steady pace in a pipe.

kfp.local and a cluster pod's log are pipes: a rich bar there is rewritten as dozens of wrapped lines (or
none until the end), so in a pipe a plain line comes every PLAIN_EVERY_S seconds and at the end instead.
Training, evaluation and transfers all report through this, so their lines read alike:
`train step 40/100 · loss 1.234 · 850 tok/s · ETA 00:01:10`.
"""

from __future__ import annotations

import threading
import time

from components.util import console

PLAIN_EVERY_S = 15.0


def count(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


def megabytes(size: float) -> str:
    return f"{size / 1e6:.1f} MB"


class StageProgress:
    """`with StageProgress("eval tuned", 300, "prompts") as p: p.advance(64)`; thread-safe (boto3 reports
    transfers from its worker threads). `quiet=True` shows nothing: validation runs under training's bar.

    In a pipe, work done in under PLAIN_EVERY_S prints nothing (the stage's result line follows at once);
    longer work ends with a line at 100%. `end_line=True` always ends with one (training's, with its loss)."""

    def __init__(self, label: str, total: float, unit: str = "", quiet: bool = False, show=count, end_line=False):
        self.label, self.total, self.unit, self.quiet, self.show = label, total, unit, quiet, show
        self.end_line = end_line
        self.live = console.is_terminal and not quiet
        self.done, self.info, self.lock, self.ended, self.lines = 0.0, "", threading.Lock(), False, 0
        self.started = self.printed = time.perf_counter()
        self.first = 0.0
        self.bar = self.task = None

    def __enter__(self) -> StageProgress:
        if self.live:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(self.label),
                BarColumn(),
                TextColumn("{task.fields[count]}"),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total, count=self._count(), info="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def start_at(self, done: float) -> None:
        """Where a resumed run begins, so the ETA counts only what this run does."""
        self.done = self.first = done
        self.started = time.perf_counter()

    def update(self, done: float | None = None, advance: float = 0.0, info: str | None = None) -> None:
        with self.lock:
            self.done = (self.done if done is None else done) + advance
            self.info = self.info if info is None else info
            if self.bar is not None:
                self.bar.update(self.task, completed=self.done, count=self._count(), info=self.info)
                return
            now, finished = time.perf_counter(), self.done >= self.total
            due = now - self.printed >= PLAIN_EVERY_S or (finished and (self.end_line or self.lines))
            if self.quiet or self.ended or not due:
                return
            self.printed, self.ended, self.lines = now, finished, self.lines + 1
            console.print(self.line(now), soft_wrap=True)

    def advance(self, amount: float) -> None:
        self.update(advance=amount)

    def _count(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.show(self.done)}/{self.show(self.total)}{unit}"

    def line(self, now: float) -> str:
        rate = (self.done - self.first) / max(now - self.started, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        info = f" · {self.info}" if self.info else ""
        return f"{self.label} {self._count()}{info} · ETA {time.strftime('%H:%M:%S', time.gmtime(left))}"
