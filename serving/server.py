"""A local server that speaks Hugging Face TGI's HTTP protocol (3.3), on CPU, for the models this project makes.

`create_app` loads a model directory (and LoRA adapters) and returns a FastAPI app; `serve` runs it with uvicorn.
Where the OpenAPI spec is silent, TGI's router is the reference: validation messages and their order, error types,
SSE frames, finish reasons. Streaming routes answer 200 and report errors as an event, as TGI does.
"""

from __future__ import annotations

import itertools
import logging
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from serving import responses, sse
from serving.body_limit import BodyLimit
from serving.engine import Engine
from serving.runtime import TGI_VERSION, ClientGone, Runtime
from serving.schemas import (
    MAX_STOP_SEQUENCES,
    ApiError,
    ChatRequest,
    CompatGenerateRequest,
    CompletionRequest,
    GenerateRequest,
)
from serving.settings import ServerSettings

router = APIRouter()

log = logging.getLogger("llmops.serve")


def _rt(request: Request) -> Runtime:
    return request.app.state.runtime


def _gone(request: Request):
    """Awaits the client's disconnect: after the body, the next ASGI message is `http.disconnect`, sent when the
    client leaves (or once the response is complete, by which time nobody awaits this any more)."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    return disconnected


def _generate_events(rt: Runtime, req: GenerateRequest) -> AsyncIterator[str]:
    index = itertools.count(1)
    return sse.events(
        rt.generate(req.inputs, req.parameters, stream=True),
        lambda step: [responses.stream_frame(next(index), step, req.inputs, req.parameters)],
        ApiError.body,
    )


@router.post("/generate")
async def generate(req: GenerateRequest, request: Request):
    rt = _rt(request)
    [steps] = await rt.complete(_gone(request), [req.inputs], req.parameters)
    return responses.generated(req.inputs, req.parameters, steps)


@router.post("/generate_stream")
async def generate_stream(req: GenerateRequest, request: Request):
    return sse.response(_generate_events(_rt(request), req))


@router.post("/")
async def compat_generate(req: CompatGenerateRequest, request: Request):
    if req.parameters.return_full_text is None:
        req.parameters.return_full_text = True  # TGI's default for a model without a hub pipeline tag
    if req.stream:
        return sse.response(_generate_events(_rt(request), req))
    return [await generate(req, request)]


@router.post("/v1/chat/completions")
async def chat_completions(chat: ChatRequest, request: Request):
    rt = _rt(request)
    inputs, params = rt.chat_prompt(chat), chat.parameters(adapter_id=rt.adapter_for(chat.model))
    head = rt.head(rt.info["model_id"] if chat.model in (None, "tgi") else chat.model)
    if chat.stream:
        usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return sse.response(
            sse.events(
                rt.generate(inputs, params, stream=True, special=False),
                lambda step: responses.chat_chunks(head, step, bool(chat.logprobs), usage),
                responses.openai_error,
                tail=sse.DONE,
            )
        )
    [steps] = await rt.complete(_gone(request), [inputs], params, special=False)
    return responses.chat_completion(head, steps, bool(chat.logprobs))


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request):
    """Several prompts are one request: all validated before any is queued, and ended together when one fails (the
    others cancelled, their slots freed), streamed or not (`serving.request_jobs`)."""
    rt, prompts = _rt(request), req.prompts()
    limit = rt.info["max_client_batch_size"]
    if req.suffix is not None:
        raise ApiError(
            422, "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported"
        )
    if len(prompts) > limit:
        raise ApiError(
            422, f"Number of prompts exceeds the maximum allowed batch size of {limit}", "batch size exceeded"
        )
    params = req.parameters(adapter_id=rt.adapter_for(req.model))
    head = rt.head(rt.info["model_id"])
    if req.stream:  # the prompts' chunks interleaved as they come; one error event ends the stream
        return sse.response(
            sse.events(
                rt.generate_all(prompts, params, stream=True),
                lambda indexed: [responses.completion_chunk(head, *indexed)],
                responses.openai_error,
                tail=sse.DONE,
            )
        )
    runs = await rt.complete(_gone(request), prompts, params)
    return responses.completion(head, [steps[-1].end for steps in runs])


@router.post("/tokenize")
async def tokenize(req: GenerateRequest, request: Request):
    rt = _rt(request)
    with rt.slot(), _as_not_found():
        return rt.tokens(req.inputs, special=True)


@router.post("/chat_tokenize")
async def chat_tokenize(chat: ChatRequest, request: Request):
    rt = _rt(request)
    with rt.slot(), _as_not_found():
        inputs = rt.chat_prompt(chat)
        return {"tokenize_response": rt.tokens(inputs, special=False), "templated_text": inputs}


@contextmanager
def _as_not_found():
    """The spec's only error status for the tokenize routes is 404, with TGI's error body (TGI itself answers 422)."""
    try:
        yield
    except ApiError as err:
        if err.status != 422:
            raise
        raise ApiError(404, err.message, err.error_type) from err


@router.get("/info")
async def info(request: Request):
    return _rt(request).info


@router.get("/health")
async def health(request: Request):
    if not _rt(request).scheduler.alive():
        return JSONResponse({"error": "unhealthy", "error_type": "healthcheck"}, status_code=503)
    return Response(status_code=200)


@router.get("/metrics")
async def metrics(request: Request):
    return Response(generate_latest(_rt(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request):
    rt = _rt(request)
    return responses.models(rt.info["model_id"], list(rt.engine.adapter_names))


async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    """A bug of ours: the client gets TGI's error shape and no exception text; the log gets the traceback."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=err)
    return JSONResponse({"error": "Internal server error", "error_type": "internal"}, status_code=500)


async def _client_gone(_: Request, err: ClientGone) -> Response:
    return Response(status_code=499)  # nobody reads it; access logs show nginx's "client closed request"


def _location(error: dict) -> str:
    """A field path such as `parameters.stop.0`; an unparsable body is located by character, which says nothing."""
    path = error["loc"][1:] if error["type"] != "json_invalid" else ()
    return ".".join(map(str, path)) or "body"


async def _body_error(_: Request, err: RequestValidationError) -> JSONResponse:
    where = ", ".join(f"{_location(e)}: {e['msg']}" for e in err.errors())
    return JSONResponse(
        {"error": f"Failed to deserialize the JSON body into the target type: {where}", "error_type": "validation"},
        status_code=422,
    )


def create_app(settings: ServerSettings) -> FastAPI:
    """Load the model (and adapters) now and return the app; the scheduler's thread starts with the app.

    `dtype="auto"` serves a bfloat16 checkpoint in bfloat16 where the CPU computes it natively (see
    `serving.engine.compute_dtype`). In any dtype a greedy answer is the same alone or in a batch, because each row
    attends only to its own columns (`serving.decode_batch`).
    """
    s = settings
    engine = Engine(s.model_dir, dtype=s.dtype, adapters=s.adapters)
    positions = engine.config.max_position_embeddings
    max_total = s.max_total_tokens or min(positions, 4096)
    max_input = s.max_input_tokens or max_total - 1
    if not 0 < max_input < max_total <= positions:
        raise ValueError(
            f"need 0 < max_input_tokens ({max_input}) < max_total_tokens ({max_total}) "
            f"<= the model's max_position_embeddings ({positions})"
        )
    info = {
        "model_id": s.model_id or s.model_dir,
        "model_sha": s.model_sha,
        "model_pipeline_tag": None,
        "max_concurrent_requests": s.max_concurrent_requests,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": max_input,
        "max_total_tokens": max_total,
        "validation_workers": 1,
        "max_client_batch_size": s.max_client_batch_size,
        "router": "text-generation-router",
        "version": TGI_VERSION,
        "sha": None,
        "docker_label": "llmops",
    }
    runtime = Runtime(engine, info, max_batch_size=s.max_batch_size, threads=s.threads)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        runtime.scheduler.start()
        yield
        runtime.scheduler.close()

    app = FastAPI(title="llmops TGI-protocol server", lifespan=lifespan)
    app.state.runtime = runtime
    app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _body_error)
    app.add_exception_handler(ClientGone, _client_gone)
    app.add_exception_handler(Exception, _unexpected)
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes)
    return app


def serve(settings: ServerSettings, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve until interrupted."""
    uvicorn.run(create_app(settings), host=host, port=port)
