"""A local server that speaks Hugging Face TGI's HTTP protocol (3.3), on CPU, for the models this project makes.

`create_app` loads a model directory (and LoRA adapters) and returns a FastAPI app; `serve` runs it with uvicorn.
Where the OpenAPI spec is silent, TGI's router is the reference: validation messages and their order, error types,
SSE frames, finish reasons. Streaming routes answer 200 and report errors as an event, as TGI does.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import aclosing, asynccontextmanager
from typing import AsyncIterator, Callable

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers.utils.chat_template_utils import render_jinja_template

from serving import schemas
from serving.engine import Batcher, Engine, Job, Step
from serving.schemas import (MAX_CLIENT_BATCH_SIZE, MAX_STOP_SEQUENCES, ApiError, ChatRequest, CompatGenerateRequest,
                             CompletionRequest, GenerateParameters, GenerateRequest, invalid)

TGI_VERSION = "3.3.6-dev0"  # the protocol version of the spec this server follows
DONE = "data: [DONE]\n\n"  # OpenAI-style streams end so; clients need the space


class Metrics:
    """TGI's metric names, in a registry of the app's own so several apps can live in one process."""

    def __init__(self, batcher: Batcher, max_total_tokens: int):
        self.registry = r = CollectorRegistry()
        token_buckets = [2**i for i in range(max_total_tokens.bit_length() + 1)]
        self.requests = Counter("tgi_request_count", "Total number of requests", registry=r)
        self.success = Counter("tgi_request_success", "Number of successful requests", registry=r)
        self.failure = Counter("tgi_request_failure", "Number of failed requests", ["err"], registry=r)
        self.duration = Histogram("tgi_request_duration", "Total time spent processing the request", registry=r)
        self.generated = Histogram("tgi_request_generated_tokens", "Generated tokens per request",
                                   buckets=token_buckets, registry=r)
        self.input_length = Histogram("tgi_request_input_length", "Input token length per request",
                                      buckets=token_buckets, registry=r)
        Gauge("tgi_queue_size", "Current queue size", registry=r).set_function(batcher.queued)
        Gauge("tgi_batch_current_size", "Current batch size", registry=r).set_function(lambda: len(batcher.running))


class Runtime:
    """What the routes share: engine, batcher, limits, metrics; turns a request into validated jobs and steps."""

    def __init__(self, engine: Engine, info: dict, *, max_batch_size: int, batch_wait_ms: float, threads: int):
        self.engine, self.info, self.in_flight = engine, info, 0
        self.batcher = Batcher(engine, max_batch_size=max_batch_size, capacity=info["max_concurrent_requests"],
                               wait_s=batch_wait_ms / 1000, threads=threads)
        self.metrics = Metrics(self.batcher, info["max_total_tokens"])
        self.fingerprint = f"{TGI_VERSION}-{info['docker_label']}"
        self.worker: asyncio.Task | None = None

    def encode(self, text: str, special: bool, *, offsets: bool = False) -> dict:
        try:
            return self.engine.tokenizer(text, add_special_tokens=special, return_offsets_mapping=offsets)
        except Exception as err:  # e.g. lone surrogates, which the Rust tokenizer cannot hold
            raise invalid(f"tokenizer error {err}") from err

    def tokens(self, text: str, special: bool) -> list[dict]:
        """TGI's /tokenize answer, whose offsets count UTF-8 bytes where Python's tokenizers count characters."""
        encoding = self.encode(text, special, offsets=True)
        byte_at = list(itertools.accumulate((len(char.encode()) for char in text), initial=0))
        return [{"id": i, "text": text[a:b], "start": byte_at[a], "stop": byte_at[b]}
                for i, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])]

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
                rendered, _ = render_jinja_template([[]], chat_template=tokenizer.get_chat_template(),
                                                    add_generation_prompt=True, **tokenizer.special_tokens_map)
                return rendered[0]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a missing template, or raise_exception() inside one
            raise ApiError(422, f"Template error: {err}", "template_error") from err

    def job(self, inputs: str, params: GenerateParameters, *, stream: bool, special: bool, emit) -> Job:
        """TGI's validation, in its order, ending in a job the batcher can run."""
        max_input, max_total = self.info["max_input_tokens"], self.info["max_total_tokens"]
        params.check(inputs, stream=stream, max_input_tokens=max_input)
        ids = self.encode(inputs, special)["input_ids"][-params.truncate if params.truncate else 0:]
        max_new = schemas.token_budget(len(ids), params.max_new_tokens, max_input, max_total)
        if params.grammar is not None:
            raise invalid("grammar is not supported")
        if params.adapter_id is not None and params.adapter_id not in self.engine.adapter_names:
            raise invalid(f"adapter `{params.adapter_id}` is not loaded; loaded: {sorted(self.engine.adapter_names)}")
        self.metrics.input_length.observe(len(ids))
        return Job(ids, params.to_sampling(max_new), params.adapter_id, emit)

    async def generate(self, inputs: str, params: GenerateParameters, *, stream: bool = False,
                       special: bool = True) -> AsyncIterator[Step]:
        """The steps of one request; raises ApiError when overloaded, invalid, or when generation fails."""
        start, job = time.perf_counter(), None
        self.metrics.requests.inc()
        if self.in_flight >= self.info["max_concurrent_requests"]:
            self.metrics.failure.labels("overloaded").inc()
            raise ApiError(429, "Model is overloaded", "overloaded")
        self.in_flight += 1
        out: asyncio.Queue[Step | Exception] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        try:
            job = self.job(inputs, params, stream=stream, special=special,
                           emit=lambda item: loop.call_soon_threadsafe(out.put_nowait, item))
            self.batcher.submit(job)
            while not (step := await self._next(out)).end:
                yield step
            self.metrics.success.inc()
            self.metrics.generated.observe(step.end.generated_tokens)
            self.metrics.duration.observe(time.perf_counter() - start)
            yield step
        except ApiError as err:
            self.metrics.failure.labels(err.error_type).inc()
            raise
        finally:
            self.in_flight -= 1
            if job is not None:
                job.cancelled = True  # a client that went away frees its row at the next step

    @staticmethod
    async def _next(out: asyncio.Queue[Step | Exception]) -> Step:
        item = await out.get()
        if isinstance(item, Exception):
            raise ApiError(424, f"Request failed during generation: {item}", "generation")
        return item

    async def complete(self, inputs: str, params: GenerateParameters, **kw) -> list[Step]:
        return [step async for step in self.generate(inputs, params, **kw)]


router = APIRouter()


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(steps: AsyncIterator[Step], frames: Callable[[Step], list[dict]],
                  error: Callable[[ApiError], dict], tail: str = "") -> AsyncIterator[str]:
    """An SSE body: the frames of each step; a failure becomes one last event, as TGI reports it in streams."""
    try:
        async with aclosing(steps):
            async for step in steps:
                for frame in frames(step):
                    yield schemas.sse(frame)
    except ApiError as err:
        yield schemas.sse(error(err))
    if tail:
        yield tail


def _generate_events(rt: Runtime, req: GenerateRequest) -> AsyncIterator[str]:
    index = itertools.count(1)
    return _events(rt.generate(req.inputs, req.parameters, stream=True),
                   lambda step: [schemas.stream_frame(next(index), step, req.inputs, req.parameters)], ApiError.body)


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request):
    return schemas.generated(req.inputs, req.parameters, await _rt(request).complete(req.inputs, req.parameters))


@router.post("/generate_stream")
async def generate_stream(req: GenerateRequest, request: Request):
    return _sse(_generate_events(_rt(request), req))


@router.post("/")
async def compat_generate(req: CompatGenerateRequest, request: Request):
    if req.parameters.return_full_text is None:
        req.parameters.return_full_text = True  # TGI's default for a model without a hub pipeline tag
    if req.stream:
        return _sse(_generate_events(_rt(request), req))
    return [await generate(req, request)]


@router.post("/v1/chat/completions")
async def chat_completions(chat: ChatRequest, request: Request):
    rt = _rt(request)
    inputs, params = rt.chat_prompt(chat), chat.parameters(adapter_id=rt.adapter_for(chat.model))
    head = rt.head(rt.info["model_id"] if chat.model in (None, "tgi") else chat.model)
    if chat.stream:
        usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return _sse(_events(rt.generate(inputs, params, stream=True, special=False),
                            lambda step: schemas.chat_chunks(head, step, bool(chat.logprobs), usage),
                            schemas.openai_error, tail=DONE))
    steps = await rt.complete(inputs, params, special=False)
    return schemas.chat_completion(head, steps, bool(chat.logprobs))


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    rt, prompts = _rt(request), req.prompts()
    if req.suffix is not None:
        raise ApiError(422, "Suffix is not supported and can be achieved by preprocessing the prompt.",
                       "suffix not supported")
    if len(prompts) > MAX_CLIENT_BATCH_SIZE:
        raise ApiError(422, f"Number of prompts exceeds the maximum allowed batch size of {MAX_CLIENT_BATCH_SIZE}",
                       "batch size exceeded")
    params = req.parameters(adapter_id=rt.adapter_for(req.model))
    head = rt.head(rt.info["model_id"])
    if req.stream:
        return _sse(_merged([_events(rt.generate(prompt, params, stream=True),
                                     lambda step, i=i: [schemas.completion_chunk(head, i, step)], schemas.openai_error)
                             for i, prompt in enumerate(prompts)]))
    runs = await asyncio.gather(*(rt.complete(prompt, params) for prompt in prompts))
    return schemas.completion(head, [steps[-1].end for steps in runs])


async def _merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
    """Interleave the prompts' streams as their events come, then close with [DONE], as TGI does."""
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[str]) -> None:
        try:
            async for event in stream:
                await queue.put(event)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(stream)) for stream in streams]
    try:
        open_streams = len(tasks)
        while open_streams:
            if (event := await queue.get()) is None:
                open_streams -= 1
            else:
                yield event
        yield DONE
    finally:
        for task in tasks:
            task.cancel()


@router.post("/tokenize")
async def tokenize(req: GenerateRequest, request: Request):
    return _rt(request).tokens(req.inputs, special=True)


@router.post("/chat_tokenize")
async def chat_tokenize(chat: ChatRequest, request: Request):
    rt = _rt(request)
    rt.metrics.requests.inc()
    try:
        inputs = rt.chat_prompt(chat)
    except ApiError as err:  # the spec's status for a chat that cannot be tokenized (TGI itself answers 422)
        raise ApiError(404, err.message, err.error_type) from err
    return {"tokenize_response": rt.tokens(inputs, special=False), "templated_text": inputs}


@router.get("/info")
async def info(request: Request):
    return _rt(request).info


@router.get("/health")
async def health(request: Request):
    worker = _rt(request).worker
    if worker is None or worker.done():
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(_rt(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    rt = _rt(request)
    return schemas.models(rt.info["model_id"], list(rt.engine.adapter_names))


async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _location(error: dict) -> str:
    """A field path such as `parameters.stop.0`; an unparsable body is located by character, which says nothing."""
    path = error["loc"][1:] if error["type"] != "json_invalid" else ()
    return ".".join(map(str, path)) or "body"


async def _body_error(_: Request, err: RequestValidationError) -> JSONResponse:
    where = ", ".join(f"{_location(e)}: {e['msg']}" for e in err.errors())
    return JSONResponse({"error": f"Failed to deserialize the JSON body into the target type: {where}",
                         "error_type": "validation"}, status_code=422)


def create_app(model_dir: str, *, model_id: str | None = None, model_sha: str | None = None,
               max_input_tokens: int | None = None, max_total_tokens: int | None = None,
               max_concurrent_requests: int = 128, max_batch_size: int = 8, adapters: dict[str, str] | None = None,
               dtype: str = "float32", batch_wait_ms: float = 5.0, threads: int = 1) -> FastAPI:
    """Load the model (and adapters) now and return the app; the batch worker starts with the app.

    float32 keeps greedy outputs the same whether a request is batched or alone. bfloat16 decoded batches twice as
    fast here, but its rounding depends on the batch's padded shape: with SmolLM2, 2 of 8 greedy answers changed
    when served together.
    """
    engine = Engine(str(model_dir), dtype=dtype, adapters=adapters)
    positions = engine.config.max_position_embeddings
    max_total = max_total_tokens or min(positions, 4096)
    max_input = max_input_tokens or max_total - 1
    if not 0 < max_input < max_total <= positions:
        raise ValueError(f"need 0 < max_input_tokens ({max_input}) < max_total_tokens ({max_total}) "
                         f"<= the model's max_position_embeddings ({positions})")
    info = {"model_id": model_id or str(model_dir), "model_sha": model_sha, "model_pipeline_tag": None,
            "max_concurrent_requests": max_concurrent_requests, "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES, "max_input_tokens": max_input, "max_total_tokens": max_total,
            "validation_workers": 1, "max_client_batch_size": MAX_CLIENT_BATCH_SIZE,
            "router": "text-generation-router", "version": TGI_VERSION, "sha": None, "docker_label": "llmops"}
    runtime = Runtime(engine, info, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms, threads=threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runtime.worker = asyncio.create_task(runtime.batcher.run())
        yield
        runtime.worker.cancel()
        runtime.batcher.close()

    app = FastAPI(title="llmops TGI-protocol server", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _body_error)
    return app


def serve(model_dir: str, host: str = "127.0.0.1", port: int = 8080, **kw) -> None:
    """Serve `model_dir` until interrupted; keyword arguments go to `create_app`."""
    uvicorn.run(create_app(model_dir, **kw), host=host, port=port)
