"""What the server's routes share: the engine, its scheduler, the limits and TGI's Prometheus metrics.

`Runtime` turns a request into validated jobs and hands their steps back to the routes in `serving.server`. Every
request, `/tokenize` included, holds one of `max_concurrent_requests` slots until it ends or its client leaves.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import contextmanager
from typing import AsyncIterator, Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers.utils.chat_template_utils import render_jinja_template

from serving import schemas
from serving.decoding import Job, Step
from serving.engine import Engine
from serving.scheduler import Scheduler
from serving.schemas import ApiError, ChatRequest, GenerateParameters, invalid

TGI_VERSION = "3.3.6-dev0"  # the protocol version of the spec this server follows
# What a client reads when the model fails; the exception and its traceback go to the server's log only.
GENERATION_FAILED = "Request failed during generation: Server error: the model failed on this request"


class Metrics:
    """TGI's metric names, in a registry of the app's own so several apps can live in one process."""

    def __init__(self, scheduler: Scheduler, max_total_tokens: int):
        self.registry = r = CollectorRegistry()
        token_buckets = [2**i for i in range(max_total_tokens.bit_length() + 1)]
        self.requests = Counter("tgi_request_count", "Total number of requests", registry=r)
        self.success = Counter("tgi_request_success", "Number of successful requests", registry=r)
        self.failure = Counter("tgi_request_failure", "Number of failed requests", ["err"], registry=r)
        self.duration = Histogram("tgi_request_duration", "Total time spent processing the request", registry=r)
        self.generated = Histogram(
            "tgi_request_generated_tokens", "Generated tokens per request", buckets=token_buckets, registry=r
        )
        self.input_length = Histogram(
            "tgi_request_input_length", "Input token length per request", buckets=token_buckets, registry=r
        )
        Gauge("tgi_queue_size", "Current queue size", registry=r).set_function(scheduler.queued)
        Gauge("tgi_batch_current_size", "Current batch size", registry=r).set_function(scheduler.running)


class Runtime:
    """What the routes share: engine, scheduler, limits, metrics; turns a request into validated jobs and steps."""

    def __init__(self, engine: Engine, info: dict, *, max_batch_size: int, threads: int):
        self.engine, self.info, self.in_flight = engine, info, 0
        self.scheduler = Scheduler(engine, max_batch_size=max_batch_size, threads=threads)
        self.metrics = Metrics(self.scheduler, info["max_total_tokens"])
        self.fingerprint = f"{TGI_VERSION}-{info['docker_label']}"

    @contextmanager
    def slot(self):
        """One of the `max_concurrent_requests` slots, or TGI's 429; freed however the request ends. Every
        request is counted here, and every error it answers with, the 429 included."""
        self.metrics.requests.inc()
        try:
            if self.in_flight >= self.info["max_concurrent_requests"]:
                raise ApiError(429, "Model is overloaded", "overloaded")
            self.in_flight += 1
            try:
                yield
            finally:
                self.in_flight -= 1
        except ApiError as err:
            self.metrics.failure.labels(err.error_type).inc()
            raise

    def encode(self, text: str, special: bool, *, offsets: bool = False) -> dict:
        try:
            return self.engine.tokenizer(text, add_special_tokens=special, return_offsets_mapping=offsets)
        except Exception as err:  # e.g. lone surrogates, which the Rust tokenizer cannot hold
            raise invalid("tokenizer error: the input is not text the tokenizer can encode") from err

    def tokens(self, text: str, special: bool) -> list[dict]:
        """TGI's /tokenize answer, whose offsets count UTF-8 bytes where Python's tokenizers count characters.

        The input limit applies here as to generation, so tokenizing cannot be used to make the server do
        unbounded work; the body cap bounds the text itself.
        """
        encoding = self.encode(text, special, offsets=True)
        schemas.check_input_length(len(encoding["input_ids"]), self.info["max_input_tokens"])
        byte_at = list(itertools.accumulate((len(char.encode()) for char in text), initial=0))
        return [
            {"id": i, "text": text[a:b], "start": byte_at[a], "stop": byte_at[b]}
            for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])
        ]

    def head(self, model: str) -> dict:
        """The fields every OpenAI-style answer starts with; TGI leaves `id` empty."""
        return {"id": "", "created": int(time.time()), "model": model, "system_fingerprint": self.fingerprint}

    def adapter_for(self, model: str | None) -> str | None:
        """OpenAI clients always fill `model` ("tgi", "dummy", a hub id), so only a loaded adapter's id selects it."""
        return model if model in self.engine.adapter_names else None

    def chat_prompt(self, chat: ChatRequest) -> str:
        messages, tokenizer = [{"role": m.role, "content": m.text()} for m in chat.messages], self.engine.tokenizer
        try:
            if not messages:  # transformers refuses an empty conversation, where TGI renders the template anyway
                rendered, _ = render_jinja_template(
                    [[]],
                    chat_template=tokenizer.get_chat_template(),
                    add_generation_prompt=True,
                    **tokenizer.special_tokens_map,
                )
                return rendered[0]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a missing template, or raise_exception() inside one
            raise ApiError(422, f"Template error: {err}", "template_error") from err

    def job(self, inputs: str, params: GenerateParameters, *, stream: bool, special: bool, emit) -> Job:
        """TGI's validation, in its order, ending in a job the scheduler can run."""
        max_input, max_total = self.info["max_input_tokens"], self.info["max_total_tokens"]
        params.check(inputs, stream=stream, max_input_tokens=max_input)
        ids = self.encode(inputs, special)["input_ids"][-params.truncate if params.truncate else 0 :]
        max_new = schemas.token_budget(len(ids), params.max_new_tokens, max_input, max_total)
        if params.grammar is not None:
            raise invalid("grammar is not supported")
        if params.adapter_id is not None and params.adapter_id not in self.engine.adapter_names:
            raise invalid(f"adapter `{params.adapter_id}` is not loaded; loaded: {sorted(self.engine.adapter_names)}")
        self.metrics.input_length.observe(len(ids))
        return Job(ids, params.to_sampling(max_new), params.adapter_id, emit)

    async def generate(
        self, inputs: str, params: GenerateParameters, *, stream: bool = False, special: bool = True
    ) -> AsyncIterator[Step]:
        """The steps of one request; raises ApiError when overloaded, invalid, or when generation fails."""
        start, job = time.perf_counter(), None
        out: asyncio.Queue[Step | Exception] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            with self.slot():
                job = self.job(
                    inputs,
                    params,
                    stream=stream,
                    special=special,
                    emit=lambda item: loop.call_soon_threadsafe(out.put_nowait, item),
                )
                self.scheduler.submit(job)
                while not (step := await self._next(out)).end:
                    yield step
                self.metrics.success.inc()
                self.metrics.generated.observe(step.end.generated_tokens)
                self.metrics.duration.observe(time.perf_counter() - start)
                yield step
        finally:
            if job is not None:
                job.cancelled = True  # a client that went away frees its row at the next step

    @staticmethod
    async def _next(out: asyncio.Queue[Step | Exception]) -> Step:
        item = await out.get()
        if isinstance(item, Exception):  # the scheduler logged it with its traceback; the client gets TGI's words
            raise ApiError(424, GENERATION_FAILED, "generation")
        return item

    async def complete(self, gone: Callable[[], Awaitable[None]], *runs: AsyncIterator[Step]) -> list[list[Step]]:
        """Every step of each run (`generate` iterators), unless `gone` (awaiting the client's disconnect) returns
        first: then the request is abandoned, its slots freed at once and its rows at the scheduler's next step."""
        work = asyncio.ensure_future(asyncio.gather(*(self._collect(run) for run in runs)))
        left = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            abandoned = not work.done()
            if abandoned:
                work.cancel()  # closes the generators: their slots are freed and their jobs marked cancelled
                await asyncio.gather(work, return_exceptions=True)
        if abandoned:
            raise ClientGone()
        return work.result()

    @staticmethod
    async def _collect(steps: AsyncIterator[Step]) -> list[Step]:
        return [step async for step in steps]


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""
