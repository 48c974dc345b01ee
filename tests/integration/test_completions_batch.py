"""`/v1/completions` with several prompts is one request: a prompt refused at validation queues none of them, and a
prompt that fails in the model ends its siblings too, so their scheduler rows and concurrency slots are free as soon
as the client has its answer, streamed or not."""

from __future__ import annotations

import json
import threading

import pytest

from tests.conftest import Live, shared_path, wait_for
from tests.integration.test_server import PROMPTS, as_tgi_means, conforms, sse_data

pytestmark = pytest.mark.integration

SLOTS = 8  # the server's concurrency limit, and the prompts of one request: a full request holds every slot
BAD = 5  # the prompt that fails, in the middle, so siblings come before and after it
GENERATION_FAILED = "Request failed during generation: Server error: the model failed on this request"


@pytest.fixture(scope="module")
def spec() -> dict:
    return as_tgi_means(json.loads(shared_path("specs", "tgi-openapi.json").read_text()))


@pytest.fixture(scope="module")
def batch_server(tiny_base):
    """Eight slots, and eight prompts allowed in one request; room for 64 new tokens after a 32-token prompt."""
    from tests.conftest import server_app

    app = server_app(
        str(tiny_base),
        model_id="tiny-llama",
        max_input_tokens=32,
        max_total_tokens=256,
        max_concurrent_requests=SLOTS,
        max_client_batch_size=SLOTS,
    )
    with Live(app) as live:
        yield live


def long_prompt(server) -> str:
    """Over the 32-token input limit, yet inside the total limit with 64 new tokens: refused for its length alone."""
    words = "card"
    while len(server.engine.tokenizer(words)["input_ids"]) <= 32:
        words += " card"
    return words


def hold_decoding_after(failed: threading.Event, server, monkeypatch) -> list:
    """Once `failed` is set, each decode step first waits until the request has freed its slots, so a sibling left
    running is still in the scheduler when the test looks. A wait in vain lands in the returned list; after it no
    step waits again, and the siblings run on."""
    decode, runtime, missed = server.engine.decode, server.app.state.runtime, []

    def held(batch):  # in the scheduler's thread
        if failed.is_set() and not missed:
            try:
                wait_for(lambda: runtime.in_flight == 0, timeout=20, what="the failed request to free its slots")
            except AssertionError as err:  # the scheduler's thread carries on; the test reads `missed`
                missed.append(err)
        return decode(batch)

    monkeypatch.setattr(server.engine, "decode", held)
    return missed


def assert_released_and_admits_a_full_request(server, monkeypatch) -> None:
    """No job of the failed request queued or running, every slot free: a full request is admitted at once."""
    runtime = server.app.state.runtime
    wait_for(
        lambda: runtime.in_flight == 0 and not runtime.scheduler.running() and not runtime.scheduler.queued(),
        timeout=10,
        what="the failed request to leave the scheduler and free its slots",
    )
    monkeypatch.undo()
    full = server.post("/v1/completions", {"prompt": PROMPTS[:SLOTS], "max_tokens": 2, "temperature": 0})
    assert full.status_code == 200, full.text
    assert [choice["index"] for choice in full.json()["choices"]] == list(range(SLOTS))


def stream_bodies(response) -> list[dict]:
    """A completion stream's events, checking that it closes with [DONE] and nothing after it."""
    *data, done = sse_data(response.text)
    assert done == "[DONE]" and "[DONE]" not in data
    return [json.loads(item) for item in data]


def always() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_an_invalid_prompt_refuses_the_request_before_any_prompt_is_queued(batch_server, spec, monkeypatch, stream):
    scheduler, submitted = batch_server.app.state.runtime.scheduler, []
    submit = scheduler.submit

    def counted(*jobs):
        submitted.extend(jobs)
        return submit(*jobs)

    monkeypatch.setattr(scheduler, "submit", counted)
    missed = hold_decoding_after(always(), batch_server, monkeypatch)  # a sibling queued after all would be held
    prompts, long = PROMPTS[:SLOTS], long_prompt(batch_server)
    prompts[BAD] = long
    n = len(batch_server.engine.tokenizer(long)["input_ids"])
    response = batch_server.post("/v1/completions", {"prompt": prompts, "max_tokens": 64, "stream": stream})
    message = f"Input validation error: `inputs` must have less than 32 tokens. Given: {n}"
    if stream:  # streams answer 200 and report the error as their one event, as TGI does
        assert response.status_code == 200
        conforms(spec, "/v1/completions", "post", response)
        assert stream_bodies(response) == [{"error": {"message": message, "http_status_code": 422}}]
    else:
        assert response.status_code == 422
        assert conforms(spec, "/v1/completions", "post", response) == [{"error": message, "error_type": "validation"}]
    assert submitted == []  # nothing was queued for a request that was refused
    assert_released_and_admits_a_full_request(batch_server, monkeypatch)
    assert not missed


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_prompt_failing_in_the_model_cancels_its_siblings(batch_server, spec, monkeypatch, phase, stream):
    from serving import decoding

    engine, failed = batch_server.engine, threading.Event()
    bad_ids = engine.tokenizer(PROMPTS[BAD])["input_ids"]
    prefill, advance = engine.prefill, decoding.Row._advance

    def failing_prefill(job):  # in the scheduler's thread
        if job.ids == bad_ids:
            failed.set()
            raise RuntimeError("simulated failure of one prompt's prefill")
        return prefill(job)

    def failing_step(row, logits, details):  # the bad prompt's second token fails; its siblings' go on
        if row.job.ids == bad_ids and row.generated == 1:
            failed.set()
            raise RuntimeError("simulated failure of one prompt's decode step")
        return advance(row, logits, details)

    if phase == "prefill":
        monkeypatch.setattr(engine, "prefill", failing_prefill)
    else:
        monkeypatch.setattr(decoding.Row, "_advance", failing_step)
    missed = hold_decoding_after(failed, batch_server, monkeypatch)
    body = {"prompt": PROMPTS[:SLOTS], "max_tokens": 64, "temperature": 0, "stream": stream}
    response = batch_server.post("/v1/completions", body)
    assert failed.is_set()
    if stream:
        assert response.status_code == 200
        conforms(spec, "/v1/completions", "post", response)
        *chunks, last = stream_bodies(response)
        # the error closes the stream: no sibling's token after it, and no other error
        assert last == {"error": {"message": GENERATION_FAILED, "http_status_code": 422}}
        assert chunks and all(chunk["object"] == "text_completion" for chunk in chunks)
    else:
        assert response.status_code == 424
        assert conforms(spec, "/v1/completions", "post", response) == [
            {"error": GENERATION_FAILED, "error_type": "generation"}
        ]
    assert_released_and_admits_a_full_request(batch_server, monkeypatch)
    assert not missed
