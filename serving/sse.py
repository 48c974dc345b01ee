"""Server-sent events as TGI sends them: one `data:` line per event, errors as a last event inside a 200 stream,
OpenAI-style streams closed by `[DONE]`, several prompts' streams interleaved as their events come."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import AsyncIterator, Callable

from fastapi.responses import StreamingResponse

from serving import responses
from serving.decoding import Step
from serving.schemas import ApiError

DONE = "data: [DONE]\n\n"  # OpenAI-style streams end so; clients need the space


def response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def events(
    steps: AsyncIterator[Step], frames: Callable[[Step], list[dict]], error: Callable[[ApiError], dict], tail: str = ""
) -> AsyncIterator[str]:
    """An SSE body: the frames of each step; a failure becomes one last event, as TGI reports it in streams."""
    try:
        async with aclosing(steps):
            async for step in steps:
                for frame in frames(step):
                    yield responses.sse(frame)
    except ApiError as err:
        yield responses.sse(error(err))
    if tail:
        yield tail


async def merged(streams: list[AsyncIterator[str]]) -> AsyncIterator[str]:
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
