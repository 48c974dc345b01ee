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
# a process that touches every page of 1 GiB, so it is resident, not only reserved
TOUCH_A_GIB = f"b = bytearray({GB}); b[::4096] = bytes(len(range(0, {GB}, 4096)))"


def test_a_stage_peak_is_its_own_or_its_largest_child_in_bytes():
    """A torchrun-launched train stage holds its memory in the workers it waits for: their peak counts."""
    script = (
        "import subprocess, sys\n"
        "from pipelines.kfp_io import peak_rss_bytes\n"
        "before = peak_rss_bytes()\n"
        f"subprocess.run([sys.executable, '-c', {TOUCH_A_GIB!r}], check=True)\n"
        "print(before, peak_rss_bytes())"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    before, after = map(int, out.split())
    assert before < GB  # the parent itself never held the gibibyte
    assert GB <= after < 2 * GB  # the child's, in bytes: a kilobyte count would read 1024x too small


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
