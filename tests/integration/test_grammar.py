"""Constrained decoding on the live server with the tiny random Llama, whose free answers are garbage, so every
answer held to a label set or a schema shows the constraint at work: TGI's `grammar` on its routes, `response_format`
on the OpenAI ones, streaming, continuous batching, stop sequences and the length limit, and 422s for grammars that
cannot compile."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.conftest import GRAMMAR_LABELS, INTENT_SCHEMA, LABEL_GRAMMAR, Live, decoded_together, shared_path
from tests.integration.test_server import as_tgi_means, conforms, sse_data

pytestmark = pytest.mark.integration

LABELS, LABEL_REGEX = set(GRAMMAR_LABELS), LABEL_GRAMMAR
PROMPTS = ["I lost my card", "hello", "where is my refund please", "exchange rate"]
CHAT = [{"role": "user", "content": "I lost my card"}]
SCHEMA = {  # the shared intent schema, plus a bounded string
    **INTENT_SCHEMA,
    "properties": {**INTENT_SCHEMA["properties"], "note": {"type": "string", "maxLength": 12}},
    "required": [*INTENT_SCHEMA["required"], "note"],
}


@pytest.fixture(scope="module")
def spec() -> dict:
    return as_tgi_means(json.loads(shared_path("specs", "tgi-openapi.json").read_text()))


@pytest.fixture(scope="module")
def server(tiny_base):
    from tests.conftest import server_app

    with Live(server_app(str(tiny_base), model_id="tiny-llama", max_concurrent_requests=32)) as live:
        yield live


def generate(server, prompt: str, **params) -> dict:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 60, "details": True, **params}}
    response = server.post("/generate", body)
    assert response.status_code == 200, response.text
    return response.json()


def events(response) -> list[dict]:
    return [json.loads(data) for data in sse_data(response.text) if data != "[DONE]"]


def test_a_regex_holds_generate_and_its_stream_to_a_label(server, spec):
    for prompt in PROMPTS:
        assert generate(server, prompt)["generated_text"] not in LABELS  # free, the tiny model spells no label
        answer = generate(server, prompt, grammar=LABEL_REGEX)
        assert answer["generated_text"] in LABELS and answer["details"]["finish_reason"] == "eos_token"
        assert answer["details"]["tokens"][-1]["special"]  # the grammar, complete, left EOS alone
    for seed in range(4):  # sampling picks only among the tokens the grammar allows
        assert (
            generate(server, PROMPTS[0], grammar=LABEL_REGEX, do_sample=True, temperature=1.5, seed=seed)[
                "generated_text"
            ]
            in LABELS
        )
    compat = server.post("/", {"inputs": PROMPTS[0], "parameters": {"grammar": LABEL_REGEX, "max_new_tokens": 20}})
    assert compat.json()[0]["generated_text"] in {PROMPTS[0] + label for label in LABELS}

    streamed = server.post(
        "/generate_stream", {"inputs": PROMPTS[0], "parameters": {"grammar": LABEL_REGEX, "details": True}}
    )
    frames = conforms(spec, "/generate_stream", "post", streamed)
    text = "".join(frame["token"]["text"] for frame in frames if not frame["token"]["special"])
    assert text in LABELS and frames[-1]["generated_text"] == text
    assert frames[-1]["details"]["finish_reason"] == "eos_token"


def test_response_format_holds_chat_and_completions_to_a_label(server, spec):
    chat = server.post("/v1/chat/completions", {"messages": CHAT, "response_format": LABEL_REGEX, "max_tokens": 30})
    [body] = conforms(spec, "/v1/chat/completions", "post", chat)
    assert body["choices"][0]["message"]["content"] in LABELS and body["choices"][0]["finish_reason"] == "stop"
    chunks = events(
        server.post(
            "/v1/chat/completions", {"messages": CHAT, "response_format": LABEL_REGEX, "max_tokens": 30, "stream": True}
        )
    )
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in chunks) in LABELS

    completion = server.post(
        "/v1/completions", {"prompt": PROMPTS[:2], "response_format": LABEL_REGEX, "max_tokens": 30}
    )
    [body] = conforms(spec, "/v1/completions", "post", completion)
    assert {choice["text"] for choice in body["choices"]} <= LABELS and len(body["choices"]) == 2
    chunks = events(
        server.post(
            "/v1/completions", {"prompt": PROMPTS[:2], "response_format": LABEL_REGEX, "max_tokens": 30, "stream": True}
        )
    )
    for index in (0, 1):  # TGI streams the closing EOS token's text in the last chunk, with its finish reason
        *tokens, last = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(token["text"] for token in tokens) in LABELS and last["finish_reason"] == "eos_token"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"parameters": {"grammar": {"type": "json", "value": SCHEMA}}}),
        ("/generate", {"parameters": {"grammar": {"type": "json", "value": json.dumps(SCHEMA)}}}),
        ("/generate", {"parameters": {"grammar": {"type": "json_schema", "value": {"name": "x", "schema": SCHEMA}}}}),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}}),
        ("/v1/chat/completions", {"response_format": {"type": "json", "value": SCHEMA}}),
        ("/v1/completions", {"response_format": {"type": "json_object", "value": SCHEMA}}),  # TGI's json alias
    ],
)
def test_a_json_schema_answer_validates_against_the_schema(server, spec, path, body):
    for prompt in PROMPTS:
        request = {
            "/generate": {"inputs": prompt, "parameters": {"max_new_tokens": 80, **body.get("parameters", {})}},
            "/v1/chat/completions": {"messages": [{"role": "user", "content": prompt}], "max_tokens": 80, **body},
            "/v1/completions": {"prompt": prompt, "max_tokens": 80, **body},
        }[path]
        [answer] = conforms(spec, path, "post", server.post(path, request))
        if path == "/generate":
            text = answer["generated_text"]
        else:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_answers_are_json_objects(server):
    """Any object: unbounded, so the random model may run to the length limit; every answer it ends is an object."""
    ended = 0
    for prompt in PROMPTS:
        body = {"messages": [{"role": "user", "content": prompt}], "response_format": {"type": "json_object"}}
        choice = server.post("/v1/chat/completions", {**body, "max_tokens": 60}).json()["choices"][0]
        assert choice["message"]["content"].startswith("{")
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(choice["message"]["content"]), dict)
            ended += 1
    assert ended >= 1, "no prompt ended its object within 60 tokens"


def test_stop_sequences_and_the_length_limit_still_end_a_constrained_row(server):
    stopped = generate(server, PROMPTS[1], grammar={"type": "regex", "value": "card_lost"}, stop=["lost"])
    assert stopped["generated_text"] == "card_lost" and stopped["details"]["finish_reason"] == "stop_sequence"
    cut = generate(server, PROMPTS[1], grammar={"type": "regex", "value": "card_lost"}, max_new_tokens=1)
    assert cut["details"]["finish_reason"] == "length" and "card_lost".startswith(cut["generated_text"])
    assert cut["generated_text"]


@pytest.mark.parametrize(
    ("path", "body", "reason"),
    [
        ("/generate", {"inputs": "card", "parameters": {"grammar": {"type": "regex", "value": "(ab"}}}, "unclosed"),
        ("/generate", {"inputs": "card", "parameters": {"grammar": {"type": "json", "value": 3}}}, "must be an object"),
        ("/", {"inputs": "card", "parameters": {"grammar": {"type": "json", "value": "{"}}}, "grammar is not valid"),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "response_format": {"type": "json", "value": {"type": "nonsense"}}},
            "Invalid type",
        ),
        ("/v1/completions", {"prompt": "card", "response_format": {"type": "regex", "value": r"(a)\1"}}, "backref"),
        ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "yaml", "value": "a"}}, "deserialize"),
        # TGI would hold the answer to a JSON grammar of the tools' calls; without tool calls that is a 422 here
        ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, "tool calls are not supported"),
    ],
)
def test_a_grammar_that_cannot_compile_is_a_422_before_anything_is_queued(
    server, spec, monkeypatch, path, body, reason
):
    submitted = []
    monkeypatch.setattr(server.app.state.runtime.scheduler, "submit", submitted.append)
    response = server.post(path, body)
    assert response.status_code == 422
    [error] = conforms(spec, path, "post", response)  # the spec's ErrorResponse
    assert reason in error["error"] and error["error_type"] == "validation" and submitted == []


def test_a_stream_reports_a_grammar_that_cannot_compile_as_tgis_error_event(server, spec):
    response = server.post(
        "/generate_stream", {"inputs": "card", "parameters": {"grammar": {"type": "regex", "value": "("}}}
    )
    [event] = conforms(spec, "/generate_stream", "post", response)
    assert event["error_type"] == "validation" and event["error"].startswith(
        "Input validation error: grammar is not valid"
    )


def test_constrained_and_free_rows_share_a_batch_and_answer_as_they_do_alone(server, monkeypatch):
    requests_ = [
        (PROMPTS[0], {}),
        (PROMPTS[0], {"grammar": LABEL_REGEX}),
        (PROMPTS[1], {"grammar": {"type": "json", "value": SCHEMA}}),
        (PROMPTS[2], {"grammar": LABEL_REGEX, "do_sample": True, "seed": 3}),
        (PROMPTS[3], {"stop": ["a"]}),
    ]

    def answer(prompt: str, extra: dict) -> tuple[str, str, list[int]]:
        body = generate(server, prompt, max_new_tokens=80, **extra)
        return body["generated_text"], body["details"]["finish_reason"], [t["id"] for t in body["details"]["tokens"]]

    alone = [answer(*request) for request in requests_]
    together, sizes = decoded_together(server, monkeypatch, requests_, answer)
    assert max(sizes) == len(requests_) and together == alone
    assert together[1][0] in LABELS and together[3][0] in LABELS
    jsonschema.validate(json.loads(together[2][0]), SCHEMA)
