"""The train task on Kubeflow Trainer, against the Kubernetes API stand-in and S3 on moto: it uploads its inputs,
creates the TrainJob, follows rank 0's log, and takes the adapter node 0 left; a failed job fails the task with
Trainer's reason; a retried task waits for the job it started, or replaces one that failed."""

import json
import threading
from pathlib import Path

import pytest
import yaml

from components import storage
from components.config import TrainSection
from components.environment import TASK_SECRETS
from pipelines import trainjob
from tests.conftest import train_metrics, wait_for
from tests.integration.kube_fake import FakeKube

pytestmark = pytest.mark.integration
NS, BUCKET = "team-a", "llmops-checkpoints"
ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/llmops/llmops-gpu:0.1.0"


class Trainer:
    """Plays Kubeflow Trainer's controller: for each TrainJob created, checks that every node can read its inputs,
    starts rank 0's pod with a log, then (as told) leaves an adapter where node 0 uploads it and completes the job,
    or fails it."""

    def __init__(self, kube: FakeKube, tmp_path, outcome: str = "complete"):
        self.kube, self.tmp, self.outcome, self.seen = kube, tmp_path, outcome, []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    def _run(self):
        while not self.stop.wait(0.02):
            for (plural, ns, name), job in list(self.kube.objects.items()):
                uid = job["metadata"].get("uid")
                if plural != "trainjobs" or uid in self.seen:
                    continue
                self.seen.append(uid)
                self._act(ns, name, job)

    def _act(self, ns: str, name: str, job: dict):
        command = job["spec"]["trainer"]["command"]
        for uri in command[4:6]:  # what each node downloads first: the task's inputs, with their manifests
            storage.download_dir(uri, self.tmp / name / uri.rsplit("/", 1)[1])
        pod = f"{name}-node-0-0-abcde"
        labels = {trainjob.JOBSET_LABEL: name, trainjob.RANK_LABEL: "0"}
        self.kube.put("pods", ns, {"metadata": {"name": pod, "labels": labels}})
        self.kube.logs[(ns, pod)] = f"train step 1/4 on node 0 of {job['spec']['trainer']['numNodes']}\n"
        if self.outcome == "complete":
            adapter = self.tmp / name / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "adapter_config.json").write_text(json.dumps({"r": 8}))
            (adapter / "train_metrics.json").write_text(json.dumps(train_metrics(train_loss=0.5, examples=16)))
            storage.upload_dir(adapter, command[6])
            condition = {"type": "Complete", "status": "True", "reason": "JobSetCompleted", "message": "done"}
        else:
            condition = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "too long"}
        job = {**self.kube.get("trainjobs", ns, name), "status": {"conditions": [condition]}}
        self.kube.put("trainjobs", ns, job)


@pytest.fixture()
def inputs(tmp_path, moto_url):
    storage.client().create_bucket(Bucket=BUCKET)
    base, data = tmp_path / "base", tmp_path / "data"
    base.mkdir(), data.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (data / "train.jsonl").write_text('{"prompt": "hi", "completion": "card_lost"}\n')
    return base, data


def config(**changes) -> TrainSection:
    return TrainSection(launcher="trainjob", nodes=2, checkpoint_root=f"s3://{BUCKET}/root", **changes)


def train(kube, cfg, base, data, out, inputs="minio://run/base\nminio://run/data"):
    launcher = trainjob.Launcher(NS, api_client=kube.api_client(), poll_s=0.02)
    return trainjob.run(cfg, base, data, out, inputs=inputs, image=IMAGE, launcher=launcher, secrets=TASK_SECRETS)


def verbs_used(requests: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """(resource, RBAC verb) of each request the task made."""
    used = set()
    for method, path in requests:
        parts = path.strip("/").split("/")
        at = parts.index("namespaces") + 2
        resource, named = "/".join(parts[at::2] if len(parts) > at + 2 else parts[at : at + 1]), len(parts) > at + 1
        verb = {"POST": "create", "DELETE": "delete"}.get(method) or ("get" if named else "list")
        used.add((resource, verb))
    return used


def test_a_completed_trainjob_hands_the_task_its_adapter_and_rank_0s_log(inputs, tmp_path, capsys):
    base, data = inputs
    with FakeKube() as kube, Trainer(kube, tmp_path):
        metrics = train(kube, config(), base, data, tmp_path / "out")
        created = [path for method, path in kube.requests if method == "POST"]
        requests = list(kube.requests)
        jobs = [key for key in kube.objects if key[0] == "trainjobs"]
    assert metrics == train_metrics(train_loss=0.5, examples=16)  # node 0's report, read back whole
    # exactly what infra/k8s/kubeflow/trainjob-rbac.yaml grants the task's ServiceAccount
    role = next(yaml.safe_load_all((ROOT / "infra" / "k8s" / "kubeflow" / "trainjob-rbac.yaml").read_text()))
    granted = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert verbs_used(requests) == {
        ("trainjobs", "get"),
        ("trainjobs", "create"),
        ("pods", "list"),
        ("pods/log", "get"),
    }
    assert verbs_used(requests) <= granted and granted - verbs_used(requests) == {("trainjobs", "delete")}
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert created == [f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainjobs"]
    ((_, ns, job_name),) = jobs
    assert ns == NS and job_name == trainjob.job_name(config(), "minio://run/base\nminio://run/data")
    # rank 0's log reached the task's own output, marked with its pod
    printed: list[str] = []  # readouterr hands each line out once: keep what it gave
    line = f"[{job_name}-node-0-0-abcde] train step 1/4 on node 0 of 2"
    wait_for(lambda: printed.append(capsys.readouterr().out) or line in "".join(printed), 10, "rank 0's log line")


def test_a_failed_trainjob_fails_the_task_with_trainers_reason_and_a_retry_replaces_it(inputs, tmp_path):
    base, data = inputs
    cfg = config(max_steps=7)
    with FakeKube() as kube:
        with Trainer(kube, tmp_path, outcome="failed"), pytest.raises(RuntimeError) as failed:
            train(kube, cfg, base, data, tmp_path / "out")
        name = trainjob.job_name(cfg, "minio://run/base\nminio://run/data")
        assert str(failed.value) == f"TrainJob {NS}/{name} failed: DeadlineExceeded: too long"
        # the retried task (kfp's retry policy) deletes the failed job and starts one that resumes and completes
        with Trainer(kube, tmp_path / "retry"):
            metrics = train(kube, cfg, base, data, tmp_path / "out")
        methods = [method for method, path in kube.requests if "/trainjobs" in path and method != "GET"]
    assert metrics["train_loss"] == 0.5
    assert methods == ["POST", "DELETE", "POST"]


def test_a_retried_task_waits_for_the_trainjob_it_started_instead_of_starting_another(inputs, tmp_path):
    """A train task preempted while its job runs: the retry finds the job by name, creates nothing, and takes the
    adapter when the job completes."""
    base, data = inputs
    cfg = config(max_steps=9)
    name = trainjob.job_name(cfg, "minio://run/base\nminio://run/data")
    where = trainjob.output_uri(cfg, name).rsplit("/", 1)[0]
    base_uri, data_uri = trainjob.storage_uri(where, "base"), trainjob.storage_uri(where, "data")
    with FakeKube() as kube:
        # the first attempt uploaded its inputs and created the job, then its pod was lost
        storage.upload_dir(base, base_uri)
        storage.upload_dir(data, data_uri)
        first = trainjob.Launcher(NS, api_client=kube.api_client())
        job = trainjob.render(
            cfg, name=name, namespace=NS, image=IMAGE, base_uri=base_uri, data_uri=data_uri, secrets=TASK_SECRETS
        )
        first.submit(job)
        with Trainer(kube, tmp_path):  # the job runs on, and completes
            metrics = train(kube, cfg, base, data, tmp_path / "out")
        posts = [path for method, path in kube.requests if method == "POST" and path.endswith("/trainjobs")]
    assert metrics["train_loss"] == 0.5 and len(posts) == 1
