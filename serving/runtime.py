"""What the server's routes share: the engine, its scheduler, the limits and TGI's Prometheus metrics.

`Runtime` turns a request into validated jobs and hands their steps back to the routes in `serving.server`. Every
prompt of a request, `/tokenize`'s included, holds one of `max_concurrent_requests` slots until the request ends or
its client leaves; a request's prompts are admitted, queued and ended together (`serving.request_jobs`).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing, contextmanager
from typing import AsyncIterator, Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from transformers.utils.chat_template_utils import render_jinja_template

from serving import schemas
from serving.decoding import Generated, Job, Step
from serving.engine import Engine
from serving.grammar import Grammars
from serving.request_jobs import JobState, RequestJobs
from serving.scheduler import Scheduler
from serving.schemas import ApiError, ChatRequest, GenerateParameters, invalid

TGI_VERSION = "3.3.6-dev0"  # the protocol version of the spec this server follows


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
        # ours, beside TGI's: the slots held now; 0 once every request has ended, however it ended
        Gauge("llmops_request_slots_in_use", "Request slots held", registry=self.metrics.registry).set_function(
            lambda: self.in_flight
        )
        self.grammars = Grammars(engine.tokenizer, engine.eos_ids, engine.model.get_output_embeddings().out_features)
        self.fingerprint = f"{TGI_VERSION}-{info['docker_label']}"

    @contextmanager
    def slot(self):
        """One slot for a request that generates nothing (the tokenize routes), counted with the error it answers
        with, the 429 included."""
        self.metrics.requests.inc()
        try:
            with self._slots(1):
                yield
        except ApiError as err:
            self.metrics.failure.labels(err.error_type).inc()
            raise

    @contextmanager
    def _slots(self, n: int):
        """`n` of the `max_concurrent_requests` slots, all or none (TGI's 429), freed however the request ends."""
        if self.in_flight + n > self.info["max_concurrent_requests"]:
            raise ApiError(429, "Model is overloaded", "overloaded")
        self.in_flight += n
        try:
            yield
        finally:
            self.in_flight -= n

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
        grammar = self.grammars.constraint(params.grammar) if params.grammar is not None else None
        if params.adapter_id is not None and params.adapter_id not in self.engine.adapter_names:
            raise invalid(f"adapter `{params.adapter_id}` is not loaded; loaded: {sorted(self.engine.adapter_names)}")
        self.metrics.input_length.observe(len(ids))
        return Job(ids, params.to_sampling(max_new), params.adapter_id, emit, grammar)

    @contextmanager
    def _admitted(
        self, prompts: list[str], params: GenerateParameters, *, stream: bool, special: bool
    ) -> Iterator[RequestJobs]:
        """A slot and a validated job for every prompt, then all queued at once: a request with one invalid prompt
        queues nothing. However the block ends, the jobs still scheduled are cancelled, so the scheduler drops them,
        and the slots are freed. Each prompt counts as a request, and as failed when the request answers an error
        before the prompt's last step."""
        group = RequestJobs()
        self.metrics.requests.inc(len(prompts))
        try:
            with self._slots(len(prompts)):
                for index, prompt in enumerate(prompts):
                    group.add(self.job(prompt, params, stream=stream, special=special, emit=group.emitter(index)))
                self.scheduler.submit(*group.jobs)
                try:
                    yield group
                finally:
                    self.scheduler.cancel(group.cancel())
        except ApiError as err:
            self.metrics.failure.labels(err.error_type).inc(len(prompts) - group.count(JobState.FINISHED))
            raise

    async def generate_all(
        self, prompts: list[str], params: GenerateParameters, *, stream: bool = False, special: bool = True
    ) -> AsyncIterator[tuple[int, Step]]:
        """Each prompt's steps as they come, with its index; raises ApiError when overloaded, when any prompt is
        invalid (before any is queued), or when any fails in the model, which ends the others too."""
        with self._admitted(prompts, params, stream=stream, special=special) as group:
            while group.scheduled():
                index, step = await group.next()
                if step.end is not None:
                    self._finished(step.end, group.start)
                yield index, step

    async def generate(
        self, inputs: str, params: GenerateParameters, *, stream: bool = False, special: bool = True
    ) -> AsyncIterator[Step]:
        """The steps of a request of one prompt; raises as `generate_all` does."""
        async with aclosing(self.generate_all([inputs], params, stream=stream, special=special)) as steps:
            async for _, step in steps:
                yield step

    def _finished(self, end: Generated, start: float) -> None:
        self.metrics.success.inc()
        self.metrics.generated.observe(end.generated_tokens)
        self.metrics.duration.observe(time.perf_counter() - start)

    async def complete(
        self,
        gone: Callable[[], Awaitable[None]],
        prompts: list[str],
        params: GenerateParameters,
        *,
        special: bool = True,
    ) -> list[list[Step]]:
        """Every step of each prompt, unless `gone` (awaiting the client's disconnect) returns first: then the request
        is abandoned, its slots freed at once and its rows at the scheduler's next step."""
        runs: list[list[Step]] = [[] for _ in prompts]

        async def collect() -> None:
            async with aclosing(self.generate_all(prompts, params, special=special)) as steps:
                async for index, step in steps:
                    runs[index].append(step)

        work, left = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
        try:
            await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
            abandoned = not work.done()
            if abandoned:
                work.cancel()  # closes the steps: the request's jobs are cancelled and its slots freed
                await asyncio.gather(work, return_exceptions=True)
        if abandoned:
            raise ClientGone()
        work.result()  # raises the request's error
        return runs


class ClientGone(Exception):
    """The client of a non-streaming request disconnected before its answer was ready."""
