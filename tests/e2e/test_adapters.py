"""Adapters you can promote, on real engines: what `make run` registered (its adapter, and the base it trained
against) plus a second adapter of the same base, promoted through the local deployer onto one base process,
real vLLM and our server alike. Each call reaches its own adapter; an adapter promoted before its base is
refused with the reason on its version, then placed once the base serves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.vllm_local import missing, python_path
from tests.conftest import free_port, wait_for
from tests.e2e.workspace import ANSWER, QUESTION, healthy, stop

pytestmark = pytest.mark.e2e

# The production models applications name; `make run` registered its candidates in `<name>-candidates`.
ADAPTER, BASE, ZERO = "llmops-demo-adapter", "llmops-demo-base", "llmops-demo-zero-adapter"
CANDIDATES = {name: f"{name}-candidates" for name in (ADAPTER, BASE, ZERO)}


def zero_adapter(tmp: Path) -> str:
    """A second adapter of the same base, registered as the register stage registers one (its own LoggedModel,
    manifest, pinning param and tags): the demo's adapter with every lora_B zeroed, so it answers as the base
    does. It has no gate verdict: a person promotes it on purpose (--override)."""
    from mlflow import MlflowClient
    from safetensors.torch import load_file, save_file

    from components.logged_model import log_adapter_model
    from components.registry_tags import ADAPTER_MANIFEST_TAG, BASE_MANIFEST_TAG, MANIFEST_TAG
    from serving.model_refs import parse_adapters

    client = MlflowClient()
    trained = Path(parse_adapters([f"a=models:/{CANDIDATES[ADAPTER]}/1"])["a"])
    tags = dict(client.get_model_version(CANDIDATES[ADAPTER], "1").tags)
    zeroed = tmp / "zero"
    zeroed.mkdir()
    for path in trained.iterdir():
        if path.name == "adapter_model.safetensors":
            weights = load_file(path)
            save_file({k: v * 0 if "lora_B" in k else v for k, v in weights.items()}, zeroed / path.name)
        elif path.name == "adapter_config.json":
            (zeroed / path.name).write_bytes(path.read_bytes())
    # MlflowClient only: the fluent API's active experiment is process-wide, and later tiers use other servers
    experiment = client.get_experiment_by_name("llmops").experiment_id
    run = client.create_run(experiment, run_name="a second adapter")
    model_id, digest = log_adapter_model(zeroed, run.info.run_id, experiment, tags["base_model_sha256"])
    client.log_param(run.info.run_id, ADAPTER_MANIFEST_TAG, digest)
    client.log_param(run.info.run_id, BASE_MANIFEST_TAG, tags[BASE_MANIFEST_TAG])  # its base, pinned as register does
    client.set_terminated(run.info.run_id)
    client.create_registered_model(CANDIDATES[ZERO])
    deploy_tags = {k: v for k, v in tags.items() if not k.startswith(("deploy.", "gate."))}
    version = client.create_model_version(
        CANDIDATES[ZERO],
        source=f"models:/{model_id}",
        run_id=run.info.run_id,
        model_id=model_id,
        tags={**deploy_tags, MANIFEST_TAG: digest},
    )
    return version.version


@pytest.fixture(scope="module")
def second_adapter(workspace, demo_run, tmp_path_factory):
    return zero_adapter(tmp_path_factory.mktemp("adapters"))


def deployer_with_adapters(workspace, alias: str, *settings: str):
    """A local deployer; both adapters promoted to `alias` before their base (refused: no base serves), then the
    base (one start, both adapters placed on it). Each promotion copies a candidate into production; promoting
    the same candidate again (the second engine's run) reuses its copy, so every production version is 1."""
    from mlflow import MlflowClient

    client = MlflowClient()
    port = free_port()
    deployer = workspace.start("deployer", "--port", str(port), "--interval", "3", f"deploy.alias={alias}", *settings)
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 120, "the deployer to listen")
    workspace.llmops("promote", CANDIDATES[ADAPTER], "1", "--reason", "e2e", "--alias", alias, "--no-wait")
    zeroed = "e2e: a zeroed adapter, to tell adapters apart"
    workspace.llmops("promote", CANDIDATES[ZERO], "1", "--override", zeroed, "--alias", alias, "--no-wait")

    def status(name: str) -> str | None:
        return client.get_model_version(name, "1").tags.get("deploy.status")

    wait_for(lambda: status(ADAPTER) == "refused", 120, "the adapter promoted before its base to be refused")
    refusal = client.get_model_version(ADAPTER, "1").tags["deploy.reason"]
    promoted = workspace.llmops("promote", CANDIDATES[BASE], "1", "--reason", "e2e", "--alias", alias, timeout=600)
    wait_for(lambda: status(ADAPTER) == status(ZERO) == "deployed", 60, "both adapters to be placed on the base")
    return deployer, refusal, promoted


@pytest.fixture(scope="module", params=["tgi", "vllm"])
def served(request, workspace, second_adapter):
    engine = request.param
    if engine == "vllm" and (reason := missing(python_path())):
        pytest.skip(f"real vLLM is not installed here: {reason}")
    workspace.env.update(LLMOPS_WEBHOOK_SECRET="e2e-secret", MLFLOW_TRACKING_URI=workspace.tracking_uri)
    alias = f"lora-{engine}"
    settings = [f"deploy.engine={engine}"] + (["deploy.extra_args.vllm=[--enforce-eager]"] if engine == "vllm" else [])
    deployer, refusal, promoted = deployer_with_adapters(workspace, alias, *settings)
    try:
        yield engine, alias, refusal, promoted
    finally:
        stop(deployer)


def test_adapters_promoted_onto_one_base_each_answer_as_trained(served):
    import requests
    from mlflow import MlflowClient

    from serving.client import chat_model

    engine, alias, refusal, _ = served
    client = MlflowClient()
    # promoted before its base, the adapter was refused, saying why, on its version
    assert "is not a base version under the alias" in refusal and "weights.base_manifest_sha256" in refusal
    base, adapter, zero = (client.get_model_version(n, "1").tags for n in (BASE, ADAPTER, ZERO))
    assert base["deploy.served_engine"] == adapter["deploy.served_engine"] == engine
    # one base process serves both adapters: the same endpoint, the base's, listing both by name
    url = base["deploy.endpoint"]
    assert adapter["deploy.endpoint"] == zero["deploy.endpoint"] == url
    assert adapter["deploy.base"] == zero["deploy.base"] == f"{BASE}/1"
    served_names = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert {ADAPTER, ZERO} <= served_names
    # each call reaches its own adapter: the trained one answers the label, the zeroed one as the base does
    trained = chat_model(f"{ADAPTER}@{alias}").invoke(QUESTION).content.strip()
    assert trained == ANSWER
    # 32 tokens tell the zeroed adapter's free answer from the label; greedy, both calls stop at the same token
    zeroed = chat_model(f"{ZERO}@{alias}", max_new_tokens=32).invoke(QUESTION).content.strip()
    system = adapter["prompt.system_prompt"]
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": adapter["prompt.user_prefix"] + QUESTION},
    ]
    body = {"model": BASE if engine == "vllm" else "tgi", "messages": messages, "temperature": 0, "max_tokens": 32}
    plain = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    assert zeroed == plain["choices"][0]["message"]["content"].strip() != ANSWER
    # held to the label set in one call, from the adapter's own tags
    labels = json.loads(adapter["prompt.label_set"])
    constrained = chat_model(f"{ADAPTER}@{alias}", constrained=True)
    for message in (QUESTION, "What is the capital of France?", "asdf qwerty"):
        assert constrained.invoke(message).content in labels, message
