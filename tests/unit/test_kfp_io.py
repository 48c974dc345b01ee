"""What the thin kfp components record per stage (pipelines/kfp_io.py): the peak memory the summary names."""

import json
import subprocess
import sys

import pytest

from components.artifacts import TIMING
from pipelines.kfp_io import stage_timings
from pipelines.run import peak_stage

pytestmark = pytest.mark.unit

GB = 1 << 30


def touching(size: int) -> str:
    """Python that holds `size` bytes resident: every page touched, so it is not only reserved."""
    return f"b = bytearray({size}); b[::4096] = bytes(len(range(0, {size}, 4096)))"


def test_a_stage_peak_is_its_own_or_its_largest_child_not_the_process_that_started_it():
    """kfp.local starts each task from `llmops run`'s process; torchrun's workers hold the train stage's memory.
    Here a process holding 1.5 GiB starts the stage, which starts a worker that holds 1 GiB."""
    stage = (
        "import subprocess, sys\n"
        "from components.util import peak_rss_bytes\n"
        "before = peak_rss_bytes()\n"
        f"subprocess.run([sys.executable, '-c', {touching(GB)!r}], check=True)\n"
        "print(before, peak_rss_bytes())"
    )
    starter = (
        f"{touching(3 * GB // 2)}\n"
        "import subprocess, sys\n"
        f"print(subprocess.run([sys.executable, '-c', {stage!r}], check=True, capture_output=True, text=True).stdout)"
    )
    out = subprocess.run([sys.executable, "-c", starter], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before < GB  # not the starter's 1.5 GiB (getrusage's ru_maxrss inherits it across fork and exec)
    assert GB <= after < 3 * GB // 2  # the worker's, in bytes: a kilobyte count would read 1024x too small


def test_the_summary_names_the_stage_that_set_the_peak(tmp_path):
    run_root = tmp_path / "run"
    paths = {}
    for stage, peak in [("train", 4.2e9), ("quantize", 9.1e9), ("eval", None)]:
        out = run_root / stage
        out.mkdir(parents=True)
        record = {"stage": stage, "seconds": 10.0, "finished": 0.0}
        if peak:
            record["peak_rss_bytes"] = int(peak)
        (out / TIMING).write_text(json.dumps(record))
        paths[stage] = str(out)
    stages = stage_timings(paths, run_root)
    assert stages["eval"]["peak_rss_bytes"] is None  # a record from before peaks were kept
    assert peak_stage(stages) == ("quantize", int(9.1e9))
    assert peak_stage({"eval": stages["eval"]}) is None
