"""The TGI-protocol server, live on loopback with the tiny Llama: TGI's OpenAPI spec as the contract, a bounded
schemathesis run, SSE framing, the concurrency limit, batching parity, LoRA adapters, and clients written elsewhere."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import Live, decoded_together, shared_path, wait_for

PROMPTS = [
    "I lost my card",
    "how do I top up my account with a transfer",
    "card",
    "where is my refund please",
    "exchange rate",
    "my PIN is blocked",
    "Classify the message: I want to cancel",
    "hello",
]
CHAT = [{"role": "user", "content": "I lost my card"}]


def as_tgi_means(node):
    """TGI's spec, read as utoipa meant it where its output is not valid OpenAPI 3.0.3.

    A nullable reference is written `allOf: [$ref]` beside `nullable: true`, which 3.0.3 reads as not nullable
    (nullable needs a `type` beside it); TGI sends null there. Bounds are written the JSON Schema 2019 way
    (`exclusiveMinimum: 0`), where 3.0 wants a boolean beside `minimum`; schemathesis refuses the former.
    """
    if isinstance(node, list):
        return [as_tgi_means(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: as_tgi_means(value) for key, value in node.items()}
    for exclusive, inclusive in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if type(node.get(exclusive)) in (int, float):
            node[inclusive], node[exclusive] = node[exclusive], True
    if node.get("nullable") and "type" not in node:
        return {"anyOf": [{key: value for key, value in node.items() if key != "nullable"}, {"enum": [None]}]}
    return node


@pytest.fixture(scope="module")
def spec() -> dict:
    return as_tgi_means(json.loads(shared_path("specs", "tgi-openapi.json").read_text()))


def random_adapter(base, out, seed: int, targets: list[str]):
    """A LoRA adapter with random non-zero A and B, so it certainly moves greedy outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=8, lora_alpha=32, target_modules=targets, init_lora_weights=False),
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_base, tmp_path_factory) -> dict:
    return {
        "lora-a": random_adapter(tiny_base, tmp_path_factory.mktemp("lora-a"), 1, ["q_proj", "v_proj", "o_proj"]),
        "lora-b": random_adapter(tiny_base, tmp_path_factory.mktemp("lora-b"), 2, ["k_proj", "up_proj", "down_proj"]),
    }


@pytest.fixture(scope="module")
def server(tiny_base, adapters):
    from tests.conftest import server_app

    app = server_app(
        str(tiny_base),
        model_id="tiny-llama",
        max_input_tokens=96,
        max_total_tokens=128,
        max_concurrent_requests=32,
        adapters={name: str(path) for name, path in adapters.items()},
        dtype="bfloat16",  # what `auto` picks on CPUs with native bfloat16; emulated elsewhere, same bits
    )
    with Live(app) as live:
        yield live


@pytest.fixture(scope="module")
def plain_server(tiny_base):
    """No adapters, and room for only two requests at once."""
    from tests.conftest import server_app

    with Live(server_app(str(tiny_base), model_id="tiny-llama", max_concurrent_requests=2)) as live:
        yield live


def sse_data(body: str) -> list[str]:
    """The payloads of an SSE body, checking TGI's framing: every event is one `data: ` line and a blank line."""
    events = body.split("\n\n")
    assert events[-1] == "", "the body must end with a blank line"
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1]), body
    return [event[len("data: ") :] for event in events[:-1]]


def conforms(spec: dict, path: str, method: str, response: requests.Response) -> list:
    """Validate a response against the spec's schema for its route, status and media type; return its bodies.

    A stream's events are validated one by one; error events, which TGI sends inside a 200 stream, against
    ErrorResponse.
    """
    from openapi_schema_validator import OAS30ReadValidator, oas30_format_checker

    def validator(schema: dict) -> OAS30ReadValidator:
        return OAS30ReadValidator({**schema, "components": spec["components"]}, format_checker=oas30_format_checker)

    documented = spec["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, f"{response.status_code} is not documented for {path}"
    content = documented[str(response.status_code)].get("content")
    if content is None:
        assert response.content == b""
        return []
    media = response.headers["content-type"]  # a list in schemathesis' responses
    media = (media[0] if isinstance(media, list) else media).split(";")[0]
    assert media in content, f"{media} is not documented for {path} {response.status_code}"
    if media == "text/event-stream":
        bodies = [json.loads(data) for data in sse_data(response.text) if data != "[DONE]"]
    else:
        bodies = [response.text if media == "text/plain" else response.json()]
    for body in bodies:
        error = body.get("error") if media == "text/event-stream" else None
        if isinstance(error, dict):  # OpenAI-style streams carry TGI's OpenaiErrorEvent, which the spec omits
            assert set(error) == {"message", "http_status_code"} and isinstance(error["message"], str)
        else:
            validator({"$ref": "#/components/schemas/ErrorResponse"} if error else content[media]["schema"]).validate(
                body
            )
    return bodies


GENERATE = {"inputs": "I lost my card", "parameters": {"max_new_tokens": 6, "details": True}}
ROUTES = [
    ("get", "/info", None),
    ("get", "/health", None),
    ("get", "/metrics", None),
    ("get", "/v1/models", None),
    ("post", "/", GENERATE),
    ("post", "/", {**GENERATE, "stream": True}),
    (
        "post",
        "/generate",
        {
            "inputs": "I lost my card",
            "parameters": {
                "max_new_tokens": 6,
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 3,
                "do_sample": True,
                "seed": 7,
                "top_k": 20,
                "top_p": 0.9,
                "typical_p": 0.95,
                "temperature": 0.8,
                "repetition_penalty": 1.2,
                "frequency_penalty": 0.3,
                "stop": ["zz"],
                "truncate": 3,
                "return_full_text": True,
            },
        },
    ),
    (
        "post",
        "/generate_stream",
        {"inputs": "I lost my card", "parameters": {"max_new_tokens": 6, "details": True, "top_n_tokens": 2}},
    ),
    ("post", "/tokenize", {"inputs": "I lost my cärd"}),
    ("post", "/chat_tokenize", {"messages": CHAT}),
    ("post", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 2}),
    (
        "post",
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 6, "stream": True, "stream_options": {"include_usage": True}},
    ),
    ("post", "/v1/completions", {"prompt": ["I lost", "my card"], "max_tokens": 6}),
    ("post", "/v1/completions", {"prompt": ["I lost", "my card"], "max_tokens": 6, "stream": True}),
]


@pytest.mark.integration
@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p} {i}" for i, (m, p, _) in enumerate(ROUTES)])
def test_routes_answer_as_the_spec_says(server, spec, method, path, body):
    response = requests.request(method, server.url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert conforms(spec, path, method, response) or path == "/health"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/generate", {"inputs": "card", "parameters": {"max_new_tokens": 500}}, "`max_new_tokens` must be <= 128"),
        ("/generate", {"inputs": "", "parameters": {}}, "`inputs` cannot be empty"),
        ("/generate", {"inputs": "card", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
        ("/generate", {"inputs": "card", "parameters": {"stop": list("abcde")}}, "supports up to 4 stop sequences"),
        ("/generate", {"inputs": "card", "parameters": {"adapter_id": "nope"}}, "adapter `nope` is not loaded"),
        ("/generate", {"inputs": "card", "parameters": {"best_of": 2}}, "`best_of` != 1 is not allowed"),
        ("/generate", {"parameters": {}}, "Failed to deserialize the JSON body"),
        ("/generate", {"inputs": 3}, "Failed to deserialize the JSON body"),
        ("/", {"inputs": "card " * 200}, "must be <= 128"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "Failed to deserialize the JSON body"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "regex", "value": "(ab"}},
            "grammar is not valid",
        ),
        ("/v1/completions", {"prompt": "card", "suffix": "x"}, "Suffix is not supported"),
    ],
)
def test_invalid_requests_get_422_with_tgi_error_bodies(server, spec, path, body, message):
    response = server.post(path, body)
    assert response.status_code == 422
    [error] = conforms(spec, path, "post", response)
    assert message in error["error"] and error["error_type"] in {"validation", "suffix not supported"}


@pytest.mark.integration
def test_streams_report_errors_as_events_like_tgi(server, spec):
    response = server.post("/generate_stream", {"inputs": "card", "parameters": {"top_p": 1.0}})
    assert response.status_code == 200
    assert conforms(spec, "/generate_stream", "post", response) == [
        {"error": "Input validation error: `top_p` must be > 0.0 and < 1.0", "error_type": "validation"}
    ]
    chat = server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 1000, "stream": True})
    first, done = sse_data(chat.text)
    assert json.loads(first)["error"]["http_status_code"] == 422 and done == "[DONE]"


@pytest.mark.integration
def test_a_failing_generation_is_a_424_and_the_server_lives_on(server, spec, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure at /secret/path")

    monkeypatch.setattr(server.engine.model, "forward", broken)
    response = server.post("/generate", GENERATE)
    assert response.status_code == 424
    # TGI's words to the client; the exception's text and traceback only in the server's log
    assert conforms(spec, "/generate", "post", response) == [
        {
            "error": "Request failed during generation: Server error: the model failed on this request",
            "error_type": "generation",
        }
    ]
    assert "simulated device failure at /secret/path" in caplog.text
    [event] = conforms(spec, "/generate_stream", "post", server.post("/generate_stream", GENERATE))
    assert event["error_type"] == "generation"
    assert server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4}).status_code == 424
    monkeypatch.undo()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert server.post("/generate", GENERATE).status_code == 200


def test_a_bug_of_ours_answers_tgis_error_shape_without_its_text(server, monkeypatch, caplog):
    def buggy(*args, **kwargs):
        raise KeyError("http://mlflow.internal:5000 secret-token")

    monkeypatch.setattr(type(server.app.state.runtime), "chat_prompt", buggy)
    response = server.post("/chat_tokenize", {"messages": CHAT})
    assert response.status_code == 500
    assert response.json() == {"error": "Internal server error", "error_type": "internal"}
    assert "secret-token" not in response.text and "secret-token" in caplog.text
    monkeypatch.undo()
    assert server.post("/chat_tokenize", {"messages": CHAT}).status_code == 200


IMPLEMENTED = {
    "/",
    "/chat_tokenize",
    "/generate",
    "/generate_stream",
    "/health",
    "/info",
    "/metrics",
    "/tokenize",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
}


@pytest.mark.integration
def test_schemathesis_finds_no_server_error_or_contract_breach(server, spec):
    """25 positive examples per implemented operation; 5xx (424 is a 4xx) or an undocumented answer fails."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    operations = [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]
    operations = [op for op in operations if op.path in IMPLEMENTED]
    assert len(operations) == len(IMPLEMENTED)
    started = time.monotonic()
    for operation in operations:

        @settings(
            max_examples=25, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
        )
        @given(case=operation.as_strategy())
        def run(case):
            response = case.call(base_url=server.url, timeout=60)
            if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
                # schemathesis reads an SSE schema as the event envelope, TGI's spec as each event's data
                case.validate_response(response, checks=checks[:-1])
                conforms(spec, operation.path, operation.method.lower(), response)
            else:
                case.validate_response(response, checks=checks)

        run()
    assert time.monotonic() - started < 120
    assert requests.get(server.url + "/health", timeout=10).status_code == 200


@pytest.mark.integration
def test_generate_stream_frames_are_tgis(server):
    params = {"max_new_tokens": 8, "details": True}
    whole = server.post("/generate", {"inputs": "I lost my card", "parameters": params}).json()
    frames = [
        json.loads(data)
        for data in sse_data(server.post("/generate_stream", {"inputs": "I lost my card", "parameters": params}).text)
    ]
    assert [frame["index"] for frame in frames] == list(range(1, 9))
    assert [frame["token"] for frame in frames] == whole["details"]["tokens"]
    assert all(frame["generated_text"] is None and frame["details"] is None for frame in frames[:-1])
    assert frames[-1]["generated_text"] == whole["generated_text"]
    assert frames[-1]["details"] == {
        "finish_reason": "length",
        "generated_tokens": 8,
        "seed": None,
        "input_length": len(server.post("/tokenize", {"inputs": "I lost my card"}).json()),
    }
    compat = [
        json.loads(data)
        for data in sse_data(
            server.post("/", {"inputs": "I lost my card", "parameters": {"max_new_tokens": 8}, "stream": True}).text
        )
    ]
    assert compat[-1]["generated_text"] == "I lost my card" + whole["generated_text"]  # TGI's default for "/"
    assert compat[-1]["details"] is None


@pytest.mark.integration
def test_chat_stream_is_openai_chunks_ending_in_done(server):
    body = {"model": "tgi", "messages": CHAT, "max_tokens": 8, "temperature": 0}
    whole = server.post("/v1/chat/completions", body).json()
    events = sse_data(
        server.post("/v1/chat/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}).text
    )
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" and chunk["model"] == "tiny-llama" for chunk in chunks)
    content, usage = chunks[:-1], chunks[-1]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * 7 + ["length"]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]


@pytest.mark.integration
def test_parameters_behave_as_in_tgi(server):
    greedy = server.post(
        "/generate", {"inputs": "I lost my card", "parameters": {"max_new_tokens": 12, "details": True}}
    ).json()
    assert greedy["details"]["seed"] is None
    stop = greedy["details"]["tokens"][2]["text"]
    stopped = server.post(
        "/generate", {"inputs": "I lost my card", "parameters": {"max_new_tokens": 12, "stop": [stop], "details": True}}
    ).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence" and stopped["details"]["generated_tokens"] <= 3
    assert stopped["generated_text"].endswith(stop)  # TGI keeps the stop sequence in the text
    sampled = [
        server.post(
            "/generate",
            {
                "inputs": "I lost my card",
                "parameters": {"max_new_tokens": 12, "do_sample": True, "seed": seed, "details": True},
            },
        ).json()
        for seed in (5, 5, 6)
    ]
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0]["details"]["seed"] == 5
    truncated = server.post(
        "/generate",
        {
            "inputs": "where is my refund please",
            "parameters": {"max_new_tokens": 2, "truncate": 3, "decoder_input_details": True},
        },
    ).json()
    assert len(truncated["details"]["prefill"]) == 3 and truncated["details"]["prefill"][0]["logprob"] is None
    assert server.text("I lost my card", return_full_text=True) == "I lost my card" + server.text("I lost my card")


@pytest.mark.integration
def test_answers_are_the_same_alone_and_in_a_batch_of_mixed_adapters_and_settings(server, monkeypatch):
    """Greedy rows on three adapters (the base among them) and seeded or penalised rows, decoded in one batch."""
    settings = [{}, {"adapter_id": "lora-a"}, {"adapter_id": "lora-b"}]
    requests_ = [(prompt, extra) for prompt in PROMPTS[:4] for extra in settings] + [
        (PROMPTS[4], {"do_sample": True, "seed": 3}),
        (PROMPTS[5], {"temperature": 0.7, "seed": 4, "stop": ["a"], "adapter_id": "lora-a"}),
        (PROMPTS[6], {"repetition_penalty": 1.3, "adapter_id": "lora-b"}),
        (PROMPTS[7], {"top_k": 5, "seed": 5, "frequency_penalty": 0.5}),
    ]

    def answer(prompt: str, extra: dict) -> tuple[str, list[int], list[float]]:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 10, "details": True, **extra}}
        details = server.post("/generate", body).json()["details"]
        return details["finish_reason"], [t["id"] for t in details["tokens"]], [t["logprob"] for t in details["tokens"]]

    alone = [answer(*request) for request in requests_]
    together, sizes = decoded_together(server, monkeypatch, requests_, answer)
    assert max(sizes) == len(requests_)  # all sixteen rows decoded together
    # The same tokens, and logprobs within float rounding: each row attends only to its own columns. A batched
    # matmul need not sum in the same order as a single row's (bit-equal on one CPU, 3e-4 apart on an AMD
    # EPYC); a row that saw another row's columns moves its logprobs by far more than 1e-3.
    assert [(reason, ids) for reason, ids, _ in together] == [(reason, ids) for reason, ids, _ in alone]
    for (_, _, got), (_, _, want) in zip(together, alone):
        assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.integration
def test_a_request_that_arrives_mid_batch_finishes_before_the_longest_row(server, monkeypatch):
    long_body = {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 80, "details": True}}
    assert server.post("/generate", long_body).json()["details"]["finish_reason"] == "length"  # no early EOS
    scheduler, decode, answered, seen = server.app.state.runtime.scheduler, server.engine.decode, threading.Event(), []

    def paced(batch):  # in the scheduler's thread, one call per decode step
        seen.append(len(batch))
        if len(batch) == 1 and 2 in seen:  # the short row has left: the long one waits until its client has the answer
            answered.wait(60)
        elif len(seen) == 5:  # five steps into the long row, let the short request arrive
            wait_for(lambda: scheduler.queued() == 1, timeout=60, what="the short request to queue")
        return decode(batch)

    monkeypatch.setattr(server.engine, "decode", paced)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(server.post, "/generate", long_body)
        wait_for(lambda: len(seen) >= 5, timeout=60, what="the long request to be decoding")
        short = server.post("/generate", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 3, "details": True}})
        still_running = not long.done()
        answered.set()
        finished = long.result()
    assert short.json()["details"]["generated_tokens"] == 3 and still_running
    assert finished.json()["details"]["generated_tokens"] == 80
    assert seen.count(2) == 2  # the short row shared the long row's steps (its first token came from its prefill)


@pytest.mark.integration
def test_over_the_limit_answers_429_and_health_stays_up(plain_server, spec, monkeypatch):
    forward, runtime, release = plain_server.engine.model.forward, plain_server.app.state.runtime, threading.Event()

    def held(*args, **kwargs):  # the admitted requests stay in flight until the test lets them go
        release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(plain_server.engine.model, "forward", held)
    body = {"inputs": "I lost my card", "parameters": {"max_new_tokens": 100}}
    with ThreadPoolExecutor(8) as pool:
        pending = [pool.submit(plain_server.post, "/generate", body) for _ in range(8)]
        try:
            wait_for(
                lambda: sum(future.done() for future in pending) == 6 and runtime.in_flight == 2,
                timeout=60,
                what="six requests answered while two hold both slots",
            )
            health = requests.get(plain_server.url + "/health", timeout=5)
            assert runtime.in_flight == 2  # health answered while the limit was full
        finally:
            release.set()
        responses = [future.result() for future in pending]
    assert health.status_code == 200
    assert sorted(r.status_code for r in responses) == [200] * 2 + [429] * 6
    for response in responses:
        if response.status_code == 429:
            assert conforms(spec, "/generate", "post", response) == [
                {"error": "Model is overloaded", "error_type": "overloaded"}
            ]
    monkeypatch.undo()
    assert plain_server.post("/generate", body).status_code == 200
    metrics = requests.get(plain_server.url + "/metrics", timeout=5).text
    for line in [
        'tgi_request_failure_total{err="overloaded"} 6.0',
        "tgi_request_count_total",
        "tgi_queue_size 0.0",
        "tgi_request_generated_tokens_bucket",
        "tgi_request_duration_bucket",
    ]:
        assert line in metrics


def hold_steps_until_released(server, monkeypatch) -> tuple[list, list]:
    """After the prefill, every model call waits until the server has released the request: (calls, missed)."""
    forward, runtime, calls, missed = server.engine.model.forward, server.app.state.runtime, [], []

    def held(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            try:
                wait_for(lambda: runtime.in_flight == 0, timeout=30, what="the server to release the abandoned request")
            except AssertionError as err:  # raised in the scheduler's thread: the test must still fail
                missed.append(err)
                raise
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.engine.model, "forward", held)
    return calls, missed


@pytest.mark.integration
def test_a_client_that_leaves_a_stream_frees_its_slot_and_row(plain_server, monkeypatch):
    runtime, (calls, missed) = plain_server.app.state.runtime, hold_steps_until_released(plain_server, monkeypatch)
    body = {"inputs": "I lost my card", "parameters": {"max_new_tokens": 400}}
    with requests.post(plain_server.url + "/generate_stream", json=body, stream=True, timeout=30) as response:
        assert next(response.iter_lines()).startswith(b"data: ")
    wait_for(
        lambda: not runtime.in_flight and not runtime.scheduler.running(),
        timeout=30,
        what="the abandoned request to free its slot and its batch row",
    )
    # Its row stopped at the first step after the client left: the prefill and at most the one held step (none
    # when the scheduler sees the client gone before its next step), not 400 steps.
    assert not missed and 1 <= len(calls) <= 2


def raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a request on a bare socket and return it unread, so the test decides when the client goes away."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}"
    sock.sendall(head.encode() + b"\r\n\r\n" + payload)
    return sock


@pytest.mark.integration
def test_an_abandoned_request_frees_its_slot_at_once_and_its_row_within_a_step(plain_server, monkeypatch):
    runtime, (calls, missed) = plain_server.app.state.runtime, hold_steps_until_released(plain_server, monkeypatch)
    client = raw_post(
        plain_server.url, "/generate", {"inputs": "I lost my card", "parameters": {"max_new_tokens": 400}}
    )
    wait_for(lambda: len(calls) == 2, timeout=30, what="the request to be decoding")
    client.close()  # a non-streaming client that gives up
    wait_for(
        lambda: not runtime.in_flight and not runtime.scheduler.running(),
        timeout=30,
        what="the abandoned request to free its slot and its batch row",
    )
    assert not missed and len(calls) == 2  # the prefill and the one step under way, not 400 steps


@pytest.mark.integration
def test_overload_is_429_never_500_while_clients_disconnect_mid_flight(plain_server, spec, monkeypatch):
    """Two slots: clients that leave free theirs although the model is stuck; the next ones get them or a 429."""
    forward, runtime, release = plain_server.engine.model.forward, plain_server.app.state.runtime, threading.Event()

    def stuck(*args, **kwargs):
        release.wait(60)
        return forward(*args, **kwargs)

    monkeypatch.setattr(plain_server.engine.model, "forward", stuck)
    body = {"inputs": "I lost my card", "parameters": {"max_new_tokens": 5}}
    statuses = []
    try:
        for _ in range(3):  # leavers take both slots, then go
            leavers = [
                raw_post(plain_server.url, "/generate", body),
                raw_post(plain_server.url, "/generate_stream", body),
            ]
            wait_for(lambda: runtime.in_flight == 2, timeout=30, what="the leavers to hold both slots")
            statuses.append(plain_server.post("/generate", body).status_code)
            for client in leavers:
                client.close()
            wait_for(lambda: runtime.in_flight == 0, timeout=30, what="the leavers' slots to be freed")
        with ThreadPoolExecutor(2) as pool:
            stayers = [pool.submit(plain_server.post, "/generate", body) for _ in range(2)]
            wait_for(lambda: runtime.in_flight == 2, timeout=30, what="two patient clients to hold both slots")
            refused = plain_server.post("/generate", body)
            release.set()
            statuses += [refused.status_code] + [future.result().status_code for future in stayers]
    finally:
        release.set()
    assert statuses == [429, 429, 429, 429, 200, 200]
    assert conforms(spec, "/generate", "post", refused) == [
        {"error": "Model is overloaded", "error_type": "overloaded"}
    ]


@pytest.mark.integration
def test_body_and_token_limits_answer_with_tgi_error_bodies(server, spec):
    from openapi_schema_validator import OAS30ReadValidator

    def error_body(response: requests.Response) -> dict:
        body = response.json()
        OAS30ReadValidator(
            {**spec["components"]["schemas"]["ErrorResponse"], "components": spec["components"]}
        ).validate(body)
        return body

    too_big = server.post("/generate", {"inputs": "a" * 2_000_001})
    chunked = requests.post(  # no Content-Length: the limit counts the bytes as they come
        server.url + "/generate", data=(b"x" * 500_000 for _ in range(5)), timeout=60
    )
    for response in (too_big, chunked):
        assert response.status_code == 413
        assert error_body(response) == {
            "error": "Request body is larger than the payload limit of 2000000 bytes",
            "error_type": "payload_too_large",
        }
    tokenizer, words = server.engine.tokenizer, "card"
    while len(tokenizer(words)["input_ids"]) <= 96:  # over max_input_tokens, yet inside max_total_tokens with 1 new
        words += " card"
    n = len(tokenizer(words)["input_ids"])
    long_input = server.post("/generate", {"inputs": words, "parameters": {"max_new_tokens": 1}})
    assert long_input.status_code == 422
    assert conforms(spec, "/generate", "post", long_input) == [
        {
            "error": f"Input validation error: `inputs` must have less than 96 tokens. Given: {n}",
            "error_type": "validation",
        }
    ]
    tokenized = server.post("/tokenize", {"inputs": words})
    assert tokenized.status_code == 404  # the spec's error status for /tokenize
    assert conforms(spec, "/tokenize", "post", tokenized)[0]["error"].endswith(f"less than 96 tokens. Given: {n}")
    assert server.post("/tokenize", {"inputs": "card"}).status_code == 200


@pytest.mark.integration
def test_prefill_details_are_each_prompt_tokens_logprob_however_they_are_chunked(server, monkeypatch):
    import torch

    from serving import engine

    prompt = "where is my refund please, I lost my card"
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}
    whole = server.post("/generate", body).json()["details"]["prefill"]
    monkeypatch.setattr(engine, "PREFILL_CHUNK", 3)
    chunked = server.post("/generate", body).json()["details"]["prefill"]
    ids = server.engine.tokenizer(prompt)["input_ids"]
    server.engine.lora.select([None])  # the bare base
    with torch.inference_mode():  # the reference: every position's logits at once
        logits = server.engine.model(input_ids=torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
    assert [t["id"] for t in whole] == ids and whole[0]["logprob"] is None
    assert [t["logprob"] for t in whole[1:]] == pytest.approx(expected, abs=1e-5)
    assert chunked == whole


@pytest.mark.integration
def test_stacked_adapters_compute_what_peft_computes(server, tiny_base, adapters):
    """The engine adds each row's adapter itself (serving.multi_lora); PEFT's own layers are the reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine, ids = server.engine, torch.tensor([server.engine.tokenizer(PROMPTS[1])["input_ids"]] * 3)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base, dtype=engine.dtype),
        adapters["lora-a"],
        adapter_name="lora-a",
        autocast_adapter_dtype=False,
    )
    reference.load_adapter(adapters["lora-b"], adapter_name="lora-b", autocast_adapter_dtype=False)
    reference.eval()
    engine.lora.select([engine.adapter_names[name] for name in ("lora-a", "lora-b")] + [None])
    with torch.inference_mode():
        ours = engine.model(input_ids=ids).logits.float()
        expected = []
        for i, name in enumerate(["lora-a", "lora-b"]):
            reference.set_adapter(name)
            expected.append(reference(input_ids=ids[i : i + 1]).logits.float()[0])
        with reference.disable_adapter():
            expected.append(reference(input_ids=ids[2:]).logits.float()[0])
    for mine, theirs in zip(ours, expected):
        assert (mine - theirs).abs().max() < 0.05 * theirs.abs().max()  # bfloat16 rounding, not another model
        assert mine[-1].argmax() == theirs[-1].argmax()
    assert (ours[0] - ours[2]).abs().max() > 0.1  # the adapters do move the logits


@pytest.mark.integration
def test_lora_adapter_changes_outputs_and_leaves_the_base_alone(server, plain_server):
    base, tuned = server.text(PROMPTS[0]), server.text(PROMPTS[0], adapter_id="lora-a")
    assert tuned != base
    assert base == plain_server.text(PROMPTS[0])  # loading an adapter does not touch base requests
    mixed = [(prompt, adapter) for prompt in PROMPTS[:4] for adapter in (None, "lora-a")]
    expected = [server.text(prompt, adapter_id=adapter) for prompt, adapter in mixed]
    with ThreadPoolExecutor(len(mixed)) as pool:
        assert list(pool.map(lambda pa: server.text(pa[0], adapter_id=pa[1]), mixed)) == expected

    def chat(model: str) -> str:
        answer = server.post(
            "/v1/chat/completions", {"model": model, "messages": CHAT, "max_tokens": 8, "temperature": 0}
        ).json()
        return answer["choices"][0]["message"]["content"]

    assert chat("lora-a") != chat("tgi") == chat("anything-else")
    listed = requests.get(server.url + "/v1/models", timeout=5).json()
    assert [m["id"] for m in listed["data"]] == ["tiny-llama", "lora-a", "lora-b"]


@pytest.mark.integration
def test_clients_written_elsewhere_work_against_the_live_server(server, monkeypatch):
    from huggingface_hub import InferenceClient
    from langchain_huggingface import ChatHuggingFace, HuggingFaceEndpoint
    from openai import OpenAI

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline mode makes the hub client refuse any URL
    # The server's own greedy answers, asked over its documented routes, are what every client must return.
    greedy = requests.post(
        server.url + "/generate", json={"inputs": "I lost my card", "parameters": {"max_new_tokens": 5}}, timeout=30
    ).json()["generated_text"]
    greedy_chat = requests.post(
        server.url + "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 5, "temperature": 0}, timeout=30
    ).json()["choices"][0]["message"]["content"]
    hub = InferenceClient(model=server.url)
    # the hub client posts to "/", where TGI (and we) default to return_full_text for a model without a task tag
    assert hub.text_generation("I lost my card", max_new_tokens=5) == "I lost my card" + greedy
    streamed = list(hub.text_generation("I lost my card", max_new_tokens=5, stream=True))
    assert len(streamed) == 5 and "".join(streamed) == greedy
    detailed = hub.text_generation("I lost my card", max_new_tokens=5, details=True)
    assert detailed.details.finish_reason == "length" and len(detailed.details.tokens) == 5
    last = list(hub.text_generation("I lost my card", max_new_tokens=5, stream=True, details=True))[-1]
    assert last.details.generated_tokens == 5 and last.generated_text is not None
    assert hub.chat_completion(CHAT, max_tokens=5).choices[0].finish_reason in {"length", "stop"}
    # Greedy from here on: a sampled reply may end early on EOS, so only greedy has a fixed length to assert.
    assert len(list(hub.chat_completion(CHAT, max_tokens=5, temperature=0, stream=True))) == 5

    oai = OpenAI(base_url=server.url + "/v1", api_key="unused")
    answer = oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=5, temperature=0)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].message.content == greedy_chat
    chunks = list(oai.chat.completions.create(model="tgi", messages=CHAT, max_tokens=5, temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"

    # LangChain sends temperature 0.8, top_p and typical_p 0.95 unless told otherwise: those sample, as in TGI
    llm = HuggingFaceEndpoint(
        endpoint_url=server.url, max_new_tokens=5, do_sample=False, temperature=None, top_p=None, typical_p=None
    )
    assert llm.invoke("I lost my card") == greedy
    assert "".join(llm.stream("I lost my card")) == greedy
    assert ChatHuggingFace(llm=llm).invoke(CHAT[-1]["content"], temperature=0).content == greedy_chat
