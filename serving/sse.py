"""Server-sent events as TGI sends them: one `data:` line per event, errors as a last event inside a 200 stream,
OpenAI-style streams closed by `[DONE]`."""

from __future__ import annotations

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
