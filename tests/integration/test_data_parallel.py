"""Data-parallel training (`train.num_processes=2`) on CPU with gloo matches one process on the same global batch.

The training set is exactly one global batch, so every step of both runs sees the same eight examples,
whatever order the samplers draw them in: the per-step losses and the adapters must then agree.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file

from components import train
from components.config import TrainSection

pytestmark = pytest.mark.integration
GLOBAL_BATCH, STEPS = 8, 4
# float32 compute: both runs then differ only in the order of floating-point sums (gloo's all-reduce
# versus one process's batch reduction). Measured here: losses 7e-8 apart (relative), weights 1.5e-7.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def one_batch(demo_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-batch")
    shutil.copytree(demo_prepared, out, dirs_exist_ok=True)
    rows = (out / "train.jsonl").read_text().splitlines()[:GLOBAL_BATCH]
    (out / "train.jsonl").write_text("\n".join(rows) + "\n")
    return out


def section(tmp_path, name, **kw):
    return TrainSection(
        max_steps=STEPS,
        log_every=1,
        checkpoint_every=STEPS,
        lora_dropout=0.0,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        compute_dtype="float32",
        checkpoint_root=str(tmp_path / f"ck-{name}"),
        **kw,
    )


def step_losses(out):
    return [h["loss"] for h in json.loads((out / "history.json").read_text()) if "loss" in h]


def test_two_gloo_processes_match_one_process(tiny_base, one_batch, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    single = train.run(section(tmp_path, "one", batch_size=GLOBAL_BATCH), tiny_base, one_batch, tmp_path / "one")
    parallel = train.run(
        section(tmp_path, "two", batch_size=GLOBAL_BATCH // 2, num_processes=2), tiny_base, one_batch, tmp_path / "two"
    )

    assert parallel["steps"] == single["steps"] == STEPS
    assert parallel["examples"] == single["examples"] == GLOBAL_BATCH
    assert parallel["non_padding_tokens"] == single["non_padding_tokens"]  # summed over the ranks
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(one) == len(two) == STEPS and one[-1] < one[0]  # it trained, and both logged every step
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    a, b = (
        load_file(tmp_path / "one" / "adapter_model.safetensors"),
        load_file(tmp_path / "two" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # the adapters moved from their zero init


def test_sigterm_stops_both_ranks_at_one_checkpoint(tiny_base, demo_prepared, tmp_path):
    """A preempted pod: SIGTERM reaches the launcher, both workers stop at the same step, one checkpoint is saved."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import time

    from components.checkpoints import last_complete_checkpoint
    from tests.conftest import wait_for

    cfg = section(tmp_path, "term", batch_size=4, num_processes=2).model_copy(
        update={"max_steps": 4000, "checkpoint_every": 4000}
    )
    code = (
        "import sys; from components import train; from components.config import TrainSection; "
        "train.run(TrainSection.model_validate_json(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    # The workers' progress bar ("train step ━━━ N/4000") is the marker that training has reached a step. Rich draws it
    # only on a terminal, so the pipe is declared one (Rich's TTY_COMPATIBLE), wide enough to keep the column.
    env.update(TTY_COMPATIBLE="1", TTY_INTERACTIVE="1", TERM="xterm", COLUMNS="200")
    proc = subprocess.Popen(
        [sys.executable, "-c", code, cfg.to_json(), str(tiny_base), str(demo_prepared), str(tmp_path / "out")],
        stdout=subprocess.PIPE,
        env=env,
    )
    chunks = []  # read all along, so a full pipe never blocks the workers
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(1 << 16), b"")), daemon=True)
    reader.start()

    def steps_done() -> int:
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
        assert proc.poll() is None, f"training ended before the signal:\n{text[-3000:]}"
        return max(map(int, re.findall(r"(\d+)/4000\b", text)), default=0)

    # Two steps done by one rank means both ranks are in the training loop, their SIGTERM handlers installed
    # (every step ends in an all-reduce of the stop flag); 4000 steps keep the end and the scheduled save far away.
    try:
        reached = wait_for(lambda: (n := steps_done()) >= 2 and n, timeout=300, what="training to reach step 2")
    finally:  # the signal goes whatever happened: a failed wait must not leave 4000 steps running
        proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    # Ranks that disagreed on the stop step would hang in an all-reduce until torchrun's shutdown
    # timeout (90 s) ends them with SIGKILL; agreeing ranks are done within a step and a save.
    assert time.monotonic() - sent < 30
    saved = last_complete_checkpoint(next((tmp_path / "ck-term").iterdir()))
    assert saved is not None and reached <= int(saved.name.split("-")[1]) < 4000  # saved at the signal's step
    reader.join(timeout=30)
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
