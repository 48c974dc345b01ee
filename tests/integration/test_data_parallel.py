"""Data-parallel training (`train.num_processes=2`) on CPU with gloo matches one process on the same global batch.

The training set is exactly one global batch, so every step of both runs sees the same eight examples,
whatever order the samplers draw them in: the per-step losses and the adapters must then agree.
"""

import json
import shutil

import pytest
from safetensors.torch import load_file

from components.config import TrainSection
from components.stages import train

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


@pytest.fixture(scope="module")
def single_run(tiny_base, one_batch, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        metrics = train.run(section(out.parent, "one", batch_size=GLOBAL_BATCH), tiny_base, one_batch, out)
    return out, metrics


@pytest.fixture(scope="module")
def two_processes(tiny_base, one_batch, tmp_path_factory):
    """Two gloo processes on the same global batch, once per strategy: (output dir, metrics)."""
    runs = {}

    def run(strategy: str):
        if strategy not in runs:
            out = tmp_path_factory.mktemp(strategy) / "out"
            cfg = section(out.parent, "two", batch_size=GLOBAL_BATCH // 2, num_processes=2, strategy=strategy)
            with pytest.MonkeyPatch.context() as mp:
                mp.delenv("MLFLOW_TRACKING_URI", raising=False)
                runs[strategy] = out, train.run(cfg, tiny_base, one_batch, out)
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(strategy, single_run, two_processes):
    """ddp copies the model to each process; fsdp shards the NF4 base and the adapter between them. Either way
    the steps are one process's, to float32 summation order."""
    (one_dir, single), (two_dir, parallel) = single_run, two_processes(strategy)

    assert parallel["parallelism"] == strategy and single["parallelism"] == "single"
    assert single["parameter_share_per_process"] == 1.0
    # what sharding is for: each process holds half the model (a row left over where a size is odd)
    expected_share = 0.5 if strategy == "fsdp" else 1.0
    assert parallel["parameter_share_per_process"] == pytest.approx(expected_share, abs=0.01)
    assert parallel["steps"] == single["steps"] == STEPS
    assert parallel["examples"] == single["examples"] == GLOBAL_BATCH
    assert parallel["non_padding_tokens"] == single["non_padding_tokens"]  # summed over the ranks
    one, two = step_losses(one_dir), step_losses(two_dir)
    assert len(one) == len(two) == STEPS and one[-1] < one[0]  # it trained, and both logged every step
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    a, b = load_file(one_dir / "adapter_model.safetensors"), load_file(two_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)  # the same format, gathered whole
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= WEIGHT_ATOL
    assert any((a[k] != 0).any() for k in a if "lora_B" in k)  # the adapters moved from their zero init


def test_the_sharded_adapter_loads_and_scores_as_the_single_process_one(
    single_run, two_processes, tiny_base, one_batch
):
    """The FSDP run's adapter, loaded the way evaluation loads one onto the NF4 base, gives the single-process
    adapter's next-token scores (its weights were compared above; this is the artifact a user hands on)."""
    import torch

    from components.inference import encode_prompts, load_model, load_tokenizer
    from components.stages.train import quantization

    (one_dir, _), (sharded, _) = single_run, two_processes("fsdp")
    prompts = [json.loads(line)["prompt"] for line in (one_batch / "train.jsonl").read_text().splitlines()]
    tok = load_tokenizer(tiny_base)
    nf4 = quantization(section(one_dir, "load"))  # the NF4 base as training rounded it
    with torch.no_grad():
        base, one, two = (
            load_model(tiny_base, "float32", d, nf4)(**encode_prompts(tok, prompts)).logits[:, -1]
            for d in (None, one_dir, sharded)
        )
    # measured: the adapter moves the logits by 0.2, and the two adapters' logits differ by 1.2e-7
    assert (one - base).abs().max() > 1000 * (two - one).abs().max()
    assert torch.equal(one.argmax(-1), two.argmax(-1))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_sigterm_stops_both_ranks_at_one_checkpoint(strategy, tiny_base, demo_prepared, tmp_path):
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

    cfg = section(tmp_path, "term", batch_size=4, num_processes=2, strategy=strategy).model_copy(
        update={"max_steps": 4000, "checkpoint_every": 4000}
    )
    code = (
        "import sys; from components.stages import train; from components.config import TrainSection; "
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


def test_a_sharded_run_resumes_from_its_checkpoint_to_the_same_adapter(tiny_base, one_batch, tmp_path, monkeypatch):
    """Preemption under FSDP: with the last checkpoint gone, the run restarts from the one before it (sharded
    optimizer state and all) and ends with the adapter of the run that was never stopped."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = section(tmp_path, "resume", batch_size=2, num_processes=2, strategy="fsdp").model_copy(
        update={"checkpoint_every": 2}
    )
    train.run(cfg, tiny_base, one_batch, tmp_path / "whole")
    (store,) = (tmp_path / "ck-resume").iterdir()
    shutil.rmtree(store / f"checkpoint-{STEPS}")  # as if the pod died between the two saves
    resumed = train.run(cfg, tiny_base, one_batch, tmp_path / "resumed")

    assert resumed["resumed_from_step"] == 2 and resumed["steps"] == STEPS
    assert step_losses(tmp_path / "resumed") == step_losses(tmp_path / "whole")
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("whole", "resumed"))
    assert all((a[k] == b[k]).all() for k in a)


def test_validation_under_fsdp_scores_as_one_process(tiny_base, tmp_path, monkeypatch):
    """Validation decodes with the sharded model on every rank (each layer gathered in turn): the curve and the
    best adapter it keeps are one process's. Both run under a time budget that does not bind: the ranks settle on
    one clock each step (a collective), and the cosine that also follows it keeps to the step schedule (a few
    seconds of an hour)."""
    from components.config import DataSection
    from components.stages import prepare_data

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tmp_path / "data"
    prepare_data.run(DataSection(val_examples=16, max_train_examples=GLOBAL_BATCH), tiny_base, data)
    runs = {}
    for name, kw in [("one", {"batch_size": GLOBAL_BATCH}), ("fsdp", {"batch_size": 4, "num_processes": 2})]:
        fsdp = {"strategy": "fsdp"} if name == "fsdp" else {}
        cfg = section(tmp_path, name, eval_every=2, max_minutes=60, **kw, **fsdp)
        runs[name] = train.run(cfg, tiny_base, data, tmp_path / name)
    keys = ("val_first_accuracy", "val_best_accuracy", "val_best_step")
    assert [runs["fsdp"][k] for k in keys] == [runs["one"][k] for k in keys]
    one, sharded = (json.loads((tmp_path / d / "validation_curve.json").read_text()) for d in ("one", "fsdp"))
    assert [(p["step"], p["accuracy"]) for p in sharded] == [(p["step"], p["accuracy"]) for p in one]
    assert [p["step"] for p in sharded] == [0, 2, 4]
