"""The pipeline survives its surroundings: an MLflow server restarted mid-call (real server, same port and
SQLite store), a stage failing half-way, and a disk that fills up while a checkpoint is written."""

import errno
import json
import os
import subprocess
import sys

import pytest
import urllib3
from urllib3.util.retry import Retry

from components.checkpoints import last_complete_checkpoint
from components.config import GateSection, RegistrySection
from components.environment import MLFLOW_RETRIES as RETRY_ENV
from components.stages import gate, register
from components.tracking import stage_run
from tests.conftest import eval_report, free_port, train_metrics

pytestmark = pytest.mark.integration


class Restartable:
    """A real `mlflow server` this module starts and stops; restart() brings it back on the same port and store."""

    def __init__(self, root):
        from pipelines import mlflow_local

        self.local, self.root, self.port = mlflow_local, root, free_port()
        self.server = self.local.start(root, port=self.port, detach=False)
        self.url = self.server.url

    def stop(self):
        self.server.stop()
        assert not self.local.healthy(self.url)

    def start(self):
        self.server = self.local.start(self.root, port=self.port, detach=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Restartable(tmp_path_factory.mktemp("mlflow-restart"))
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def mlflow_env(server, monkeypatch):
    if not server.local.healthy(server.url):  # a test that failed while it was down leaves it down: not ours
        server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv("LLMOPS_EXPERIMENT", "hardening")
    for name in RETRY_ENV:  # the stages' own settings, not a developer's
        monkeypatch.delenv(name, raising=False)
    from mlflow import MlflowClient

    return MlflowClient()


@pytest.fixture
def retries(server, monkeypatch):
    """Records every retry urllib3 makes for mlflow; when armed, the first one restarts the server first.

    The server is down at the failing attempt and up again before the next one, so the test needs no timing.
    """
    seen, armed = [], []
    original = Retry.increment

    def increment(self, method=None, url=None, response=None, error=None, *args, **kw):
        seen.append((method, url, type(error).__name__ if error else response.status))
        if armed:
            armed.clear()
            server.start()
        return original(self, method, url, response, error, *args, **kw)

    monkeypatch.setattr(Retry, "increment", increment)
    return seen, armed


PARTS = ("prompt", "completion", "total")
SCORES = {"exact_match": 0.8, "perplexity": 2.0, "loss": 0.7, "memory_bytes": 1, "disk_bytes": 1}


def fake_stage_outputs(root):
    """Well-formed outputs of the stages before register (register reads reports, not weights)."""
    files = {
        "base/llmops_base.json": {"source": "tiny", "weights_sha256": "b" * 64},
        "data/stats.json": {
            "source_sha256": "d" * 64,
            "prepared_sha256": "p" * 64,
            "format": "label",
            "rejected": 0,
            "train": 8,
            "eval": 2,
            "source": "tickets.csv",
            **{"rows_read": 10, "examples": 10, "reject_reasons": {}, "validation": 0, "rows_kept": 10},
            **{"label_list_in_prompt": True, "num_labels": 2},
            **{f"{part}_tokens": {"min": 1, "mean": 1.0, "p50": 1, "p95": 1, "max": 1} for part in PARTS},
        },
        "train/train_metrics.json": train_metrics(steps=4, train_loss=1.5),
        "train/adapter_config.json": {"r": 8},
        "eval/eval_report.json": eval_report(
            {"exact_match": 0.1, "perplexity": 9.0, "n": 2}, {"exact_match": 0.8, "perplexity": 2.0, "n": 2}
        ),
        "quantize/quantize_report.json": {
            "results": {"merged": SCORES},
            "recommended_quantize": "none",
            "served": {**SCORES, "quantize": "none", "examples": 2},
            "examples": 2,
            "thresholds": {},
        },
        "merged/merge_report.json": {
            **{"parity": 1.0, "compare_dtype": "float32", "reference": "the 16-bit base + adapter"},
            **{"merged_into": "16bit", "threshold": 0.9, "prompts": 2, "size_bytes": 1, "nf4_adapter_lost": 1.0},
        },
        "merged/model/config.json": {"model_type": "llama"},
        "merged/model/tokenizer_config.json": {"chat_template": "{{ messages }}"},
    }
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(json.dumps(content))
    for split in ("train", "eval"):
        row = {"id": "tickets.csv:2", "answer": "card_lost", "prompt": "p", "completion": "card_lost"}
        (root / "data" / f"{split}.jsonl").write_text(json.dumps(row) + "\n")
    return {k: root / k for k in ("base", "data", "train", "eval", "merged", "quantize")}


def versions_of(client, name, pipeline_run):
    return [v.version for v in register.versions_of_run(client, name, pipeline_run)]


def test_stage_run_rides_out_a_server_restart(server, mlflow_env, retries):
    seen, armed = retries
    with stage_run("prepare_data", {"rows": 3}) as tracker:
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == RETRY_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]
        server.stop()  # the server goes away in the middle of the stage
        armed.append(True)
        tracker.log_metrics({"data.examples": 3})
    assert seen and seen[0][2] in ("NewConnectionError", "ProtocolError", "MaxRetryError")
    run = mlflow_env.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["data.examples"] == 3


def test_a_create_retried_after_a_lost_response_leaves_one_version(server, mlflow_env, tmp_path, monkeypatch):
    """The server commits the new version, then restarts before answering; the client retries the POST."""
    from urllib3.connectionpool import HTTPConnectionPool

    original, calls = HTTPConnectionPool._make_request, []

    def make_request(self, conn, method, url, *args, **kw):
        response = original(self, conn, method, url, *args, **kw)
        if "model-versions/create" in url:
            calls.append(url)
            if len(calls) == 1:
                server.stop()
                server.start()
                raise urllib3.exceptions.ProtocolError(
                    "Connection aborted.", ConnectionResetError(errno.ECONNRESET, "reset")
                )
        return response

    monkeypatch.setattr(HTTPConnectionPool, "_make_request", make_request)
    result = register.run(
        RegistrySection(model_name="hard-dup", adapters=False), fake_stage_outputs(tmp_path), "run-dup"
    )
    assert len(calls) == 2  # the create really was sent twice
    assert versions_of(mlflow_env, "hard-dup-candidates", "run-dup") == [result["version"]] == ["1"]
    again = register.run(
        RegistrySection(model_name="hard-dup", adapters=False), fake_stage_outputs(tmp_path), "run-dup"
    )
    assert again["reused"] and again["version"] == result["version"]


def test_register_rides_out_a_restart_before_the_version_is_created(server, mlflow_env, retries, tmp_path, monkeypatch):
    seen, armed = retries
    original = register.ensure_registered_model

    def then_restart(client, name):
        server.stop()
        armed.append(True)
        original(client, name)

    monkeypatch.setattr(register, "ensure_registered_model", then_restart)
    result = register.run(
        RegistrySection(model_name="hard-restart", adapters=False), fake_stage_outputs(tmp_path), "run-restart"
    )
    assert seen and not armed  # a request failed, the server came back, the retry went through
    assert versions_of(mlflow_env, "hard-restart-candidates", "run-restart") == [result["version"]]
    assert register.is_complete(mlflow_env, mlflow_env.get_model_version("hard-restart-candidates", result["version"]))
    assert mlflow_env.get_run(result["run_id"]).info.status == "FINISHED"


def test_gate_rides_out_a_server_restart(server, mlflow_env, retries, tmp_path):
    seen, armed = retries
    outputs = fake_stage_outputs(tmp_path)
    registration = register.run(RegistrySection(model_name="hard-gate", adapters=False), outputs, "run-gate")
    server.stop()
    armed.append(True)
    verdict = gate.run(GateSection(), registration, outputs["eval"], outputs["data"])
    assert seen and verdict["passed"]
    tags = mlflow_env.get_model_version(registration["name"], registration["version"]).tags
    assert tags["gate.verdict"] == "passed" and tags["gate.champion_version"] == "none"


def test_a_register_failing_midway_marks_its_run_failed_and_registers_nothing(mlflow_env, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    original = MlflowClient.log_model_artifacts

    def disk_error_on_adapter(self, model_id, local_dir, artifact_path=None):
        raise OSError(errno.EIO, "I/O error reading the adapter")

    monkeypatch.setattr(MlflowClient, "log_model_artifacts", disk_error_on_adapter)
    outputs = fake_stage_outputs(tmp_path)
    with pytest.raises(OSError, match="I/O error"):
        register.run(RegistrySection(model_name="hard-fail", adapters=False), outputs, "run-fail")
    runs = mlflow_env.search_runs(
        [mlflow_env.get_experiment_by_name("hardening").experiment_id], "tags.`llmops.pipeline_run` = 'run-fail'"
    )
    assert [r.info.status for r in runs] == ["FAILED"]
    assert versions_of(mlflow_env, "hard-fail-candidates", "run-fail") == []
    monkeypatch.setattr(MlflowClient, "log_model_artifacts", original)  # the retried step registers one whole version
    result = register.run(RegistrySection(model_name="hard-fail", adapters=False), outputs, "run-fail")
    assert versions_of(mlflow_env, "hard-fail-candidates", "run-fail") == [result["version"]] and not result["reused"]


def test_finalize_closes_a_killed_run_and_deletes_a_half_registered_version(mlflow_env, tmp_path):
    from mlflow.entities import RunStatus

    cfg = RegistrySection(model_name="hard-final", adapters=False)
    experiment = mlflow_env.get_experiment_by_name("hardening") or mlflow_env.get_experiment(
        mlflow_env.create_experiment("hardening")
    )
    killed = mlflow_env.create_run(experiment.experiment_id, tags={register.PIPELINE_RUN_TAG: "run-killed"})
    register.ensure_registered_model(mlflow_env, cfg.candidates)
    half = mlflow_env.create_model_version(
        cfg.candidates,
        source=f"{killed.info.artifact_uri}/model",
        run_id=killed.info.run_id,
        tags={register.PIPELINE_RUN_TAG: "run-killed"},
    )  # no lineage, no files
    summary = register.finalize(cfg, "run-killed", "FAILED")
    assert summary["failed_runs"] == [killed.info.run_id] and "version" not in summary
    assert mlflow_env.get_run(killed.info.run_id).info.status == RunStatus.to_string(RunStatus.FAILED)
    assert versions_of(mlflow_env, cfg.candidates, "run-killed") == []
    assert half.version not in [v.version for v in mlflow_env.search_model_versions(f"name='{cfg.candidates}'")]


def test_a_version_that_holds_an_alias_survives_finalize_whatever_its_tags_say(mlflow_env, tmp_path):
    """A served version whose lineage tag was edited looks incomplete: finalize keeps it, because an alias names it."""
    cfg = RegistrySection(model_name="hard-aliased", adapters=False)
    result = register.run(cfg, fake_stage_outputs(tmp_path), "run-aliased")
    mlflow_env.set_registered_model_alias(cfg.candidates, "champion", result["version"])
    # a lineage tag deleted by hand: the version now looks half-registered
    mlflow_env.delete_model_version_tag(cfg.candidates, result["version"], "dataset_sha256")
    register.finalize(cfg, "run-aliased", "FAILED")
    assert versions_of(mlflow_env, cfg.candidates, "run-aliased") == [result["version"]]
    mlflow_env.delete_registered_model_alias(cfg.candidates, "champion")
    register.finalize(cfg, "run-aliased", "FAILED")  # with no alias left, an incomplete version goes
    assert versions_of(mlflow_env, cfg.candidates, "run-aliased") == []


def test_finalize_publishes_the_summary_of_a_successful_run(mlflow_env, tmp_path):
    cfg = RegistrySection(model_name="hard-final-ok", adapters=False)
    result = register.run(cfg, fake_stage_outputs(tmp_path), "run-ok")
    register.record_summary({**result, "stages": {"train": {"seconds": 1.0, "cached": False}}})
    summary = register.finalize(cfg, "run-ok", "SUCCEEDED")
    assert summary["state"] == "SUCCEEDED" and summary["failed_runs"] == []
    assert summary["version"] == result["version"] and summary["stages"]["train"]["seconds"] == 1.0
    assert versions_of(mlflow_env, cfg.candidates, "run-ok") == [result["version"]]


STEPS, EVERY, FAIL_AT = 12, 4, 8
DISK_FULL = """
import errno, json, os, sys
from transformers import Trainer, TrainerState

def full(path):
    raise OSError(errno.ENOSPC, "No space left on device", path)

if sys.argv[2] == "optimizer":  # the adapter is written, the optimizer state runs out of space
    save = Trainer._save_optimizer_and_scheduler
    def broken(self, output_dir):
        if self.state.global_step == {fail}:
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as fh:
                fh.write(b"\\0" * 4096)
            full(os.path.join(output_dir, "optimizer.pt"))
        return save(self, output_dir)
    Trainer._save_optimizer_and_scheduler = broken
elif sys.argv[2] == "state":  # everything but the last file: trainer_state.json stops half-way
    to_json = TrainerState.save_to_json
    def broken(self, json_path):
        if self.global_step == {fail}:
            to_json(self, json_path)
            text = open(json_path).read()
            open(json_path, "w").write(text[: len(text) // 2])
            full(json_path)
        return to_json(self, json_path)
    TrainerState.save_to_json = broken

from components.config import TrainSection
from components.stages.train import run
run(TrainSection(max_steps={steps}, checkpoint_every={every}, log_every={every}, checkpoint_root={root!r}),
    {base!r}, {data!r}, sys.argv[1])
"""


def train(code, out, where="none"):
    return subprocess.run(
        [sys.executable, "-c", code, str(out), where],
        capture_output=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.parametrize("where", ["optimizer", "state"])
def test_disk_full_during_a_checkpoint_keeps_the_previous_one_and_resumes_from_it(
    tiny_base, demo_prepared, tmp_path, where
):
    root = tmp_path / "ckpt"
    code = DISK_FULL.format(
        fail=FAIL_AT, steps=STEPS, every=EVERY, root=str(root), base=str(tiny_base), data=str(demo_prepared)
    )
    failed = train(code, tmp_path / "out1", where)
    assert failed.returncode != 0 and b"No space left on device" in failed.stderr
    (run_dir,) = root.iterdir()
    assert (run_dir / f"checkpoint-{FAIL_AT}").is_dir()  # the broken checkpoint is there, but not complete
    assert last_complete_checkpoint(run_dir) == run_dir / f"checkpoint-{EVERY}"
    resumed = train(code, tmp_path / "out2")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    metrics = json.loads((tmp_path / "out2" / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] == EVERY and metrics["steps"] == STEPS
    assert last_complete_checkpoint(run_dir) == run_dir / f"checkpoint-{STEPS}"
    assert (tmp_path / "out2" / "adapter_model.safetensors").exists()
