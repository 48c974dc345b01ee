"""Training survives the pod: SIGKILL mid-run resumes to the same adapter, SIGTERM saves and exits,
and checkpoints on S3 (moto on loopback) restore into a fresh machine."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

from components.checkpoints import last_complete_checkpoint

pytestmark = pytest.mark.integration
STEPS, EVERY = 40, 4


def script(base, data, root):
    return (
        "import sys; from components.stages.train import run; from components.config import TrainSection; "
        f"run(TrainSection(max_steps={STEPS}, checkpoint_every={EVERY}, log_every=4, checkpoint_root={root!r}), "
        f"{str(base)!r}, {str(data)!r}, sys.argv[1])"
    )


# One intra-op thread: with two, CPU reductions follow the thread schedule and two identical runs
# already differ in the last bits, so only one thread makes "the same adapter" a bitwise claim.
DETERMINISTIC = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(code, out):
    return subprocess.Popen(
        [sys.executable, "-c", code, str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=DETERMINISTIC,
    )


def wait_for_checkpoint(root, proc, at_least=EVERY, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        dirs = list(root.glob("*"))
        if dirs and (ck := last_complete_checkpoint(dirs[0])) and int(ck.name.split("-")[1]) >= at_least:
            return dirs[0]
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared before the run ended")


def adapter(path):
    return load_file(path / "adapter_model.safetensors")


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tiny_base, demo_prepared, tmp_path):
    whole = subprocess.run(
        [sys.executable, "-c", script(tiny_base, demo_prepared, str(tmp_path / "a")), str(tmp_path / "whole")],
        capture_output=True,
        timeout=600,
        env=DETERMINISTIC,
    )
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]

    code = script(tiny_base, demo_prepared, str(tmp_path / "b"))
    proc = start(code, tmp_path / "killed")
    run_dir = wait_for_checkpoint(tmp_path / "b", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = int(last_complete_checkpoint(run_dir).name.split("-")[1])
    resumed = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "resumed")], capture_output=True, timeout=600, env=DETERMINISTIC
    )
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    metrics = json.loads((tmp_path / "resumed" / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == killed_at < STEPS and metrics["steps"] == STEPS
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_checkpoint_and_exits_for_a_retry(tiny_base, demo_prepared, tmp_path):
    proc = start(script(tiny_base, demo_prepared, str(tmp_path / "c")), tmp_path / "out")
    run_dir = wait_for_checkpoint(tmp_path / "c", proc)
    before = int(last_complete_checkpoint(run_dir).name.split("-")[1])
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code = proc.wait(timeout=90)  # inside Kubernetes' grace period (the manifests give 90 s or more)
    saved = last_complete_checkpoint(run_dir)
    assert code == 128 + signal.SIGTERM and time.monotonic() - sent < 90
    assert before < int(saved.name.split("-")[1]) < STEPS  # saved on the way out, not at the next interval
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()  # no final adapter from a stopped run


def test_checkpoints_on_s3_restore_on_a_fresh_machine(tiny_base, demo_prepared, moto_url, tmp_path, monkeypatch):
    from components import storage

    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "machine1"))
    (tmp_path / "machine1").mkdir()
    code = script(tiny_base, demo_prepared, f"s3://{bucket}/checkpoints")
    first = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "o1")],
        capture_output=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path / "machine1")},
    )
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    keys = [o["Key"] for o in storage.client().list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.endswith(f"checkpoint-{STEPS}/{storage.MANIFEST}") for k in keys)
    (tmp_path / "machine2").mkdir()  # an empty local disk: everything must come from S3
    second = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "o2")],
        capture_output=True,
        timeout=600,
        env={**os.environ, "TMPDIR": str(tmp_path / "machine2")},
    )
    assert second.returncode == 0, second.stderr.decode()[-2000:]
    assert json.loads((tmp_path / "o2" / "train_metrics.json").read_text())["resumed_from_step"] == STEPS
    a, b = adapter(tmp_path / "o1"), adapter(tmp_path / "o2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_state_and_best_adapter_follow_the_checkpoints_to_s3(moto_url, tmp_path):
    """A retried pod on a fresh node must know the best adapter seen so far, or it could hand on a worse one;
    a kill between a new best's upload and its record leaves the previous best whole and named."""
    from components import storage
    from components.checkpoints import VALIDATION, CheckpointStore

    bucket = f"ckpt-{uuid.uuid4().hex[:8]}"
    storage.client().create_bucket(Bucket=bucket)
    remote = f"s3://{bucket}/checkpoints/run"
    first = CheckpointStore(tmp_path / "machine1", remote)

    def best(step, accuracy, record=True):
        name = f"best-{step}"
        (first.local / name).mkdir(parents=True)
        (first.local / name / "adapter_model.safetensors").write_bytes(os.urandom(4096))
        first.push(name)
        if record:
            (first.local / VALIDATION).write_text(
                json.dumps({"best": {"step": step, "accuracy": accuracy, "dir": name}, "curve": []})
            )
            first.push(VALIDATION)
        return (first.local / name / "adapter_model.safetensors").read_bytes()

    def restored(machine):
        fresh = CheckpointStore(tmp_path / machine, remote)
        fresh.restore()
        record = json.loads((fresh.local / VALIDATION).read_text())["best"]
        return record["dir"], (fresh.local / record["dir"] / "adapter_model.safetensors").read_bytes()

    assert CheckpointStore(tmp_path / "empty", remote).restore() is None  # nothing pushed yet: nothing comes back
    assert not (tmp_path / "empty" / VALIDATION).exists()
    weights_50 = best(50, 0.7)
    assert restored("machine2") == ("best-50", weights_50)
    weights_100 = best(100, 0.8, record=False)  # killed before the record went up
    assert restored("machine3") == ("best-50", weights_50)
    (first.local / VALIDATION).write_text(
        json.dumps({"best": {"step": 100, "accuracy": 0.8, "dir": "best-100"}, "curve": []})
    )
    first.push(VALIDATION)
    assert restored("machine4") == ("best-100", weights_100)
    CheckpointStore(tmp_path / "local-only").push(
        VALIDATION
    )  # a PVC root is durable as is: nothing to upload, no error


@pytest.mark.parametrize(
    "best_dir", ["../../outside", "/tmp/absolute", "best-12/../../outside", "best-x", 7, None, "checkpoint-4"]
)
def test_names_read_back_from_s3_are_checked_before_they_touch_the_disk(moto_url, tmp_path, capsys, best_dir):
    """Object keys and validation's best.dir come from storage anyone with bucket access can write: a name that is
    not one this code writes is skipped with a warning, never followed, and the restore still finds what is whole."""
    from components import storage
    from components.checkpoints import VALIDATION, CheckpointStore

    bucket = f"names-{uuid.uuid4().hex[:8]}"
    s3 = storage.client()
    s3.create_bucket(Bucket=bucket)
    remote = f"s3://{bucket}/checkpoints/run"
    good = tmp_path / "src" / "checkpoint-3"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text("{}")
    (good / "adapter_model.safetensors").write_bytes(os.urandom(64))
    storage.upload_dir(good, f"{remote}/checkpoint-3")
    for name in ("checkpoint-abc", "checkpoint-9/../../escape", "checkpoint-12/nested"):  # each would win or crash
        s3.put_object(Bucket=bucket, Key=f"checkpoints/run/{name}/{storage.MANIFEST}", Body=b"{}")
    record = {"best": {"step": 12, "accuracy": 0.9, "dir": best_dir}, "curve": []}
    s3.put_object(Bucket=bucket, Key=f"checkpoints/run/{VALIDATION}", Body=json.dumps(record).encode())

    machine = tmp_path / "machine" / "ckpt"
    restored = CheckpointStore(machine, remote).restore()
    assert restored == machine / "checkpoint-3"
    said = capsys.readouterr().out
    assert "skipping 'checkpoint-abc'" in said and "skipping 'checkpoint-9/../../escape'" in said
    assert f"skipping {best_dir!r}" in said or best_dir is None
    # nothing was written outside the checkpoint directory
    assert sorted(p.name for p in (tmp_path / "machine").iterdir()) == ["ckpt"]
    assert not (tmp_path / "outside").exists() and not (tmp_path / "escape").exists()
    assert sorted(p.name for p in machine.iterdir()) == ["checkpoint-3", VALIDATION]
