"""Progress in a pipe (components/progress.py): plain lines at a steady pace, never a rewrapped bar."""

import threading

import pytest

from components import progress

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_a_long_task_prints_a_line_every_15_s_and_one_at_the_end(clock, capsys):
    assert not progress.console.is_terminal  # pytest captures: a pipe, as under kfp.local
    with progress.StageProgress("eval tuned answers", 100, "prompts") as shown:
        for _ in range(10):  # 10 batches of 10, 4 s each: lines at 16 s and 32 s, then the end
            clock.now += 4
            shown.advance(10)
    out = lines(capsys)
    assert out == [
        "eval tuned answers 40/100 prompts · ETA 00:00:24",
        "eval tuned answers 80/100 prompts · ETA 00:00:08",
        "eval tuned answers 100/100 prompts · ETA 00:00:00",
    ]


def test_a_short_task_prints_nothing_unless_asked_for_its_end_line(clock, capsys):
    with progress.StageProgress("eval base loss", 3, "examples") as shown:
        shown.advance(3)
    assert lines(capsys) == []
    with progress.StageProgress("train step", 4, end_line=True) as shown:
        shown.start_at(2)  # resumed at step 2: the ETA counts the steps this run does
        clock.now += 5
        shown.update(3, info="loss 1.500 · 90 tok/s")
        clock.now += 5
        shown.update(4)
    assert lines(capsys) == ["train step 4/4 · loss 1.500 · 90 tok/s · ETA 00:00:00"]
    with progress.StageProgress("validation", 10, quiet=True) as shown:
        clock.now += 60
        shown.advance(10)
    assert lines(capsys) == []


def test_bytes_reported_from_transfer_threads_add_up(clock, capsys):
    with progress.StageProgress("upload s3://b/x", 4_000_000, show=progress.megabytes) as shown:
        workers = [threading.Thread(target=lambda: [shown.advance(1000) for _ in range(1000)]) for _ in range(4)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        clock.now += 20
        shown.advance(0)
    assert shown.done == 4_000_000
    assert lines(capsys) == ["upload s3://b/x 4.0 MB/4.0 MB · ETA 00:00:00"]
