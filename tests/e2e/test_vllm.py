"""Real vLLM (installed by `make vllm`) serving what `make run` registered: promoted through the local deployer
(the README's, engine auto), answered by `llmops chat`, chat_model(...) and a plain OpenAI client, its answers held to
the version's label set, and a tampered file refused before vLLM starts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from serving.vllm_local import missing, python_path
from tests.conftest import free_port, wait_for
from tests.e2e.workspace import ANSWER, LLMOPS, QUESTION, healthy, stop

pytestmark = pytest.mark.e2e

if reason := missing(python_path()):
    pytest.skip(f"real vLLM is not installed here: {reason}", allow_module_level=True)

ALIAS = "champion"  # the README's deployer serves it with real vLLM here (tests/e2e/conftest.py: champion)


@pytest.fixture(scope="module")
def vllm_deployer(champion):
    """The session's champion, which the local profile's engine auto serves with real vLLM where it is installed:
    one vLLM start for the README's flow and these tests. Returns the promote's output."""
    promoted, status = champion
    assert status["deploy.status"] == "deployed" and status["deploy.served_engine"] == "vllm", status
    return promoted


def test_a_promoted_version_is_served_by_real_vllm(workspace, vllm_deployer):
    import requests
    from mlflow import MlflowClient
    from openai import OpenAI

    tags = MlflowClient().get_model_version("llmops-demo", "1").tags
    assert tags["deploy.status"] == "deployed" and tags["deploy.served_engine"] == "vllm", tags
    url = tags["deploy.endpoint"]
    assert f"serves at {url}" in vllm_deployer.stdout
    # vLLM itself answers: its /v1/models names the version (TGI's /info does not exist there)
    served = [m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]]
    assert served == ["llmops-demo", "models:/llmops-demo/1"]
    assert requests.get(f"{url}/info", timeout=10).status_code == 404
    # the prompt contract holds: a bare message gets its label, from the CLI, LangChain and a plain client
    answer = workspace.llmops("chat", QUESTION, "--model", f"llmops-demo@{ALIAS}").stdout.strip()
    assert answer == ANSWER
    reply = OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
        model="llmops-demo", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=16
    )
    assert reply.choices[0].message.content.strip() == ANSWER


def test_chat_model_speaks_openai_to_vllm_and_constrains_to_the_label_set(workspace, vllm_deployer):
    from langchain_openai import ChatOpenAI
    from mlflow import MlflowClient

    from serving.client import chat_model

    labels = json.loads(MlflowClient().get_model_version("llmops-demo", "1").tags["prompt.label_set"])
    free = chat_model(f"llmops-demo@{ALIAS}")
    assert isinstance(free, ChatOpenAI)
    assert free.invoke(QUESTION).content.strip() == ANSWER
    constrained = chat_model(f"llmops-demo@{ALIAS}", constrained=True)
    # off-topic messages, where the tuned model may answer anything: the constraint still gives a label
    for message in (QUESTION, "What is the capital of France?", "Write me a poem about the sea", "asdf qwerty"):
        assert constrained.invoke(message).content in labels, message


def test_a_tampered_file_is_refused_before_vllm_starts(workspace, vllm_deployer, tmp_path):
    """`llmops serve --engine vllm` checks the cached files against the manifest before it hands them to vLLM:
    a changed byte ends it with the file's name, and no vLLM process ever starts."""
    serving_dir = tmp_path / "serving"
    env = {**workspace.env, "LLMOPS_SERVING_DIR": str(serving_dir)}
    port = str(free_port())
    args = [LLMOPS, "serve", "models:/llmops-demo/1", "--engine", "vllm", "--port", port]
    # What serve does before it starts vLLM: download into the cache and verify (a real vLLM start is the
    # promoted version's test); then serve meets the cached copy, changed.
    fetch = "from serving.model_refs import local_model; local_model('models:/llmops-demo/1')"
    subprocess.run([sys.executable, "-c", fetch], cwd=workspace.path, env=env, check=True, timeout=300)
    weights = next(serving_dir.glob("models/llmops-demo/1/model/**/model.safetensors"))
    with weights.open("r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    done = subprocess.run(args, cwd=workspace.path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "refused models:/llmops-demo/1" in done.stderr and "model.safetensors" in done.stderr
    assert "serving models:/llmops-demo/1" not in done.stdout, "verification passed and vLLM was started"
    shutil.rmtree(serving_dir)


def held_out_messages(labels: list[str], n: int = 100) -> list[tuple[str, str]]:
    """Demo-style tickets `make run` never trained on (another seed, minus every text of its data set)."""
    from components.demo_data import generate_rows

    trained = {row["text"] for row in generate_rows()}
    # 600: the templates make about 1,500 distinct texts; past that the generator would look for ever.
    rows = [r for r in generate_rows(600, seed=11) if r["text"] not in trained and r["label"] in labels]
    assert len(rows) >= n
    return [(row["text"], row["label"]) for row in rows[:n]]


def answers(post, bodies: list[dict]) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:  # bounded: eight in flight, each request once
        return list(pool.map(post, bodies))


def constrained_routes(url: str, engine: str, labels: list[str]):
    """(route name, body for a message, how to read the answer) for every route of the engine, constrained."""
    import requests

    from serving.client import label_regex

    regex = label_regex(tuple(labels))

    def post(path, read):
        return lambda body: read(requests.post(f"{url}{path}", json=body, timeout=120).json())

    chat = post("/v1/chat/completions", lambda r: r["choices"][0]["message"]["content"])
    completion = post("/v1/completions", lambda r: r["choices"][0]["text"])
    if engine == "vllm":
        rule = {"structured_outputs": {"regex": regex}}
        return [
            ("chat", chat, lambda m: {"model": "llmops-demo", "messages": [{"role": "user", "content": m}], **rule}),
            ("completions", completion, lambda m: {"model": "llmops-demo", "prompt": m, **rule}),
        ]
    grammar = {"type": "regex", "value": regex}
    generate = post("/generate", lambda r: r["generated_text"])
    return [
        ("chat", chat, lambda m: {"messages": [{"role": "user", "content": m}], "response_format": grammar}),
        ("completions", completion, lambda m: {"prompt": m, "response_format": grammar}),
        ("generate", generate, lambda m: {"inputs": m, "parameters": {"grammar": grammar, "max_new_tokens": 16}}),
    ]


@pytest.fixture(scope="module")
def our_server(workspace, demo_run):
    port = free_port()
    workspace.env["MLFLOW_TRACKING_URI"] = workspace.tracking_uri
    server = workspace.start("serve", "models:/llmops-demo/1", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or server.poll() is not None, 180, "llmops serve to answer /health")
        assert server.poll() is None, (workspace.path / "serve.log").read_text()[-3000:]
        yield url
    finally:
        stop(server)


@pytest.mark.parametrize("engine", ["vllm", "tgi"])
def test_held_out_prompts_get_only_valid_labels_and_json_that_validates_on_both_engines(
    engine, vllm_deployer, our_server
):
    import jsonschema
    import requests
    from mlflow import MlflowClient

    tags = MlflowClient().get_model_version("llmops-demo", "1").tags
    url = tags["deploy.endpoint"] if engine == "vllm" else our_server
    labels = json.loads(tags["prompt.label_set"])
    rows = held_out_messages(labels)
    for route, post, body in constrained_routes(url, engine, labels):
        messages = [m for m, _ in rows] if route == "chat" else [m for m, _ in rows[:10]]
        got = answers(post, [{**body(m), "temperature": 0, "max_tokens": 16} for m in messages])
        assert set(got) <= set(labels), (engine, route, sorted(set(got) - set(labels)))
        if route == "chat":  # the tuned model on tickets it never saw, held to the label set
            accuracy = sum(a == label for a, (_, label) in zip(got, rows)) / len(rows)
            print(f"{engine}: constrained label accuracy on {len(rows)} held-out tickets {accuracy:.2f}")
            assert accuracy > 0.5
    schema = {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": labels}, "urgent": {"type": "boolean"}},
        "required": ["label", "urgent"],
        "additionalProperties": False,
    }
    json_rule = (
        {"structured_outputs": {"json": schema}, "model": "llmops-demo"}
        if engine == "vllm"
        else {"response_format": {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema}}}
    )
    for message, _ in rows[:5]:
        body = {"messages": [{"role": "user", "content": message}], "temperature": 0, "max_tokens": 64, **json_rule}
        reply = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
        jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)
