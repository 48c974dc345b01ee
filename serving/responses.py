"""The bodies the server answers with, kept apart from the request models in `serving.schemas`: the wire formats of
TGI's own responses (`generated`, `stream_frame`) and of its OpenAI-compatible ones (chat and text completions, their
stream chunks, errors and the model list), as plain dicts in TGI's field order built from the engine's steps.
"""

from __future__ import annotations

import json

from serving.decoding import Generated, Step
from serving.schemas import ApiError, GenerateParameters


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}\n\n"


def generated(inputs: str, params: GenerateParameters, steps: list[Step]) -> dict:
    end = steps[-1].end
    body: dict = {"generated_text": (inputs if params.return_full_text else "") + end.text}
    if params.details or params.decoder_input_details:
        details = {
            "finish_reason": end.finish_reason,
            "generated_tokens": end.generated_tokens,
            "seed": end.seed,
            "prefill": steps[0].prefill or [],
            "tokens": [step.token for step in steps],
        }
        if params.top_n_tokens:
            details["top_tokens"] = [step.top_tokens for step in steps]
        body["details"] = details
    return body


def stream_frame(index: int, step: Step, inputs: str, params: GenerateParameters) -> dict:
    """TGI's StreamResponse: `generated_text` and `details` stay null until the last token."""
    frame: dict = {"index": index, "token": step.token}
    if step.top_tokens:
        frame["top_tokens"] = step.top_tokens
    end = step.end
    frame["generated_text"] = None if end is None else (inputs if params.return_full_text else "") + end.text
    frame["details"] = None
    if end is not None and params.details:
        frame["details"] = {
            "finish_reason": end.finish_reason,
            "generated_tokens": end.generated_tokens,
            "seed": end.seed,
            "input_length": end.input_length,
        }
    return frame


def usage(end: Generated) -> dict:
    return {
        "prompt_tokens": end.input_length,
        "completion_tokens": end.generated_tokens,
        "total_tokens": end.input_length + end.generated_tokens,
    }


def openai_reason(reason: str) -> str:
    return "stop" if reason == "eos_token" else reason


def _logprobs(steps: list[Step]) -> dict:
    return {
        "content": [
            {
                "token": s.token["text"],
                "logprob": s.token["logprob"],
                "top_logprobs": [{"token": t["text"], "logprob": t["logprob"]} for t in s.top_tokens],
            }
            for s in steps
        ]
    }


def chat_completion(head: dict, steps: list[Step], logprobs: bool) -> dict:
    end = steps[-1].end
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": end.text},
        "logprobs": _logprobs(steps) if logprobs else None,
        "finish_reason": openai_reason(end.finish_reason),
    }
    return {"object": "chat.completion", **head, "choices": [choice], "usage": usage(end)}


def chat_chunks(head: dict, step: Step, logprobs: bool, include_usage: bool) -> list[dict]:
    """One token as an OpenAI delta (special tokens, like the closing EOS, become empty content, as in TGI), and
    after the last one a chunk with the usage alone, when asked for."""
    delta = {"role": "assistant", "content": "" if step.token["special"] else step.token["text"]}
    choice = {
        "index": 0,
        "delta": delta,
        "logprobs": _logprobs([step]) if logprobs else None,
        "finish_reason": openai_reason(step.end.finish_reason) if step.end else None,
    }
    chunks = [{"object": "chat.completion.chunk", **head, "choices": [choice], "usage": None}]
    if step.end and include_usage:
        chunks.append({"object": "chat.completion.chunk", **head, "choices": [], "usage": usage(step.end)})
    return chunks


def completion(head: dict, ends: list[Generated]) -> dict:
    choices = [
        {"index": i, "text": end.text, "logprobs": None, "finish_reason": openai_reason(end.finish_reason)}
        for i, end in enumerate(ends)
    ]
    total = {
        key: sum(usage(end)[key] for end in ends) for key in ("prompt_tokens", "completion_tokens", "total_tokens")
    }
    return {"object": "text_completion", **head, "choices": choices, "usage": total}


def completion_chunk(head: dict, index: int, step: Step) -> dict:
    """TGI streams completions as chunks with an empty finish reason, then a final one with its raw reason."""
    choice = {
        "index": index,
        "text": step.token["text"],
        "logprobs": None,
        "finish_reason": step.end.finish_reason if step.end else "",
    }
    chunk = {"object": "text_completion", **head, "choices": [choice]}
    if step.end:
        chunk["usage"] = usage(step.end)
    return chunk


def openai_error(err: ApiError) -> dict:
    """TGI's error event on OpenAI-style streams, which always says 422."""
    return {"error": {"message": err.message, "http_status_code": 422}}


def models(model_id: str, adapters: list[str]) -> dict:
    """TGI answers an OpenAI model list while the spec documents one ModelInfo: this body is both."""

    def card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": model_id}

    return {**card(model_id), "object": "list", "data": [card(name) for name in [model_id, *adapters]]}
