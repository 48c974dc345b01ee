"""Request bodies of the TGI 3.3 HTTP protocol, and the errors it answers with.

Field types follow TGI's Rust structs rather than the looser OpenAPI text: unsigned integers reject negatives,
and the models are strict, because serde refuses `"1"` for a number or `1` for a string where pydantic would coerce.
Checks that TGI makes after parsing (ranges, stop count, best_of) live in `GenerateParameters.check`.
Responses are plain dicts in TGI's field order, built from the engine's steps in `serving.responses`.
"""

from __future__ import annotations

import json
import secrets
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from serving.decoding import Sampling

U32 = Annotated[int, Field(ge=0, le=2**32 - 1)]
U64 = Annotated[int, Field(ge=0, le=2**64 - 1)]
USIZE = Annotated[int, Field(ge=0)]  # unbounded here: only compared, never handed to torch
I32 = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]
MAX_STOP_SEQUENCES, MAX_TOP_N_TOKENS, MAX_CLIENT_BATCH_SIZE = 4, 5, 4  # TGI launcher defaults


class ApiError(Exception):
    """An error TGI reports as `{"error", "error_type"}` with an HTTP status."""

    def __init__(self, status: int, message: str, error_type: str):
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type

    def body(self) -> dict:
        return {"error": self.message, "error_type": self.error_type}


def invalid(message: str) -> ApiError:
    return ApiError(422, f"Input validation error: {message}", "validation")


class Strict(BaseModel):
    model_config = ConfigDict(strict=True)


class JsonGrammar(Strict):
    type: Literal["json", "json_object"]  # TGI reads `json_object` as `json`
    value: Any  # a JSON Schema: an object, or a string holding one


class RegexGrammar(Strict):
    type: Literal["regex"]
    value: str


class JsonSchemaConfig(Strict):
    name: str | None = None
    schema_: Any = Field(alias="schema")  # `schema` would shadow a BaseModel method


class JsonSchemaGrammar(Strict):
    type: Literal["json_schema"]
    value: JsonSchemaConfig


def _openai_form(data: Any) -> Any:
    """OpenAI's response_format spellings, read as TGI's GrammarType: a bare `json_object` is any JSON object, and
    `json_schema` carries its config under `json_schema` where TGI has `value`."""
    if isinstance(data, dict) and "value" not in data:
        if data.get("type") == "json_object":
            return {"type": "json", "value": {"type": "object"}}
        if data.get("type") == "json_schema" and "json_schema" in data:
            return {"type": "json_schema", "value": data["json_schema"]}
    return data


# TGI's GrammarType, `{"type", "value"}` tagged by `type`, compiled by `serving.grammar`
GrammarType = Annotated[
    JsonGrammar | RegexGrammar | JsonSchemaGrammar, Field(discriminator="type"), BeforeValidator(_openai_form)
]


class GenerateParameters(Strict):
    adapter_id: str | None = None
    best_of: USIZE | None = None
    decoder_input_details: bool = False
    details: bool = False
    do_sample: bool = False
    frequency_penalty: float | None = None
    grammar: GrammarType | None = None
    max_new_tokens: U32 | None = None
    repetition_penalty: float | None = None
    return_full_text: bool | None = None
    seed: U64 | None = None
    stop: list[str] = []
    temperature: float | None = None
    top_k: I32 | None = None
    top_n_tokens: U32 | None = None
    top_p: float | None = None
    truncate: USIZE | None = None
    typical_p: float | None = None
    watermark: bool = False

    def to_sampling(self, max_new_tokens: int) -> Sampling:
        """The engine's settings; like TGI, any warper that changes the distribution turns sampling on."""
        warped = (
            (self.temperature or 1.0) != 1.0
            or bool(self.top_k)
            or (self.top_p or 1.0) < 1.0
            or (self.typical_p or 1.0) < 1.0
        )
        return Sampling(
            max_new_tokens=max_new_tokens,
            do_sample=self.do_sample or warped,
            temperature=self.temperature or 1.0,
            top_k=self.top_k or 0,
            top_p=self.top_p or 1.0,
            typical_p=self.typical_p or 1.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=self.seed if self.seed is not None else secrets.randbits(63),
            stop=tuple(self.stop),
            top_n_tokens=self.top_n_tokens or 0,
            prefill_details=self.decoder_input_details,
        )

    def check(self, inputs: str, *, stream: bool, max_input_tokens: int) -> None:
        """TGI's validation before tokenizing, in its order, so the first error reported is the same."""
        if stream and self.decoder_input_details:
            raise invalid("`decoder_input_details` == true is not supported when streaming tokens")
        if self.best_of not in (None, 1):
            raise invalid(
                "`best_of` != 1 is not supported when streaming tokens"
                if stream
                else "`best_of` != 1 is not allowed for this endpoint"
            )
        rules = [
            (self.temperature is not None and self.temperature <= 0, "`temperature` must be strictly positive"),
            (
                self.repetition_penalty is not None and self.repetition_penalty <= 0,
                "`repetition_penalty` must be strictly positive",
            ),
            (
                self.frequency_penalty is not None and not -2.0 <= self.frequency_penalty <= 2.0,
                "`frequency_penalty` must be >= -2.0 and <= 2.0",
            ),
            (self.top_p is not None and not 0.0 < self.top_p < 1.0, "`top_p` must be > 0.0 and < 1.0"),
            (self.typical_p is not None and not 0.0 < self.typical_p < 1.0, "`typical_p` must be > 0.0 and < 1.0"),
            (self.top_k is not None and self.top_k <= 0, "`top_k` must be strictly positive"),
            (self.max_new_tokens == 0, "`max_new_tokens` must be strictly positive"),
            (
                len(self.stop) > MAX_STOP_SEQUENCES,
                f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(self.stop)}",
            ),
            (
                (self.top_n_tokens or 0) > MAX_TOP_N_TOKENS,
                f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {self.top_n_tokens}",
            ),
            (not inputs, "`inputs` cannot be empty"),
            (
                self.truncate is not None and not 0 < self.truncate <= max_input_tokens,
                f"`truncate` must be strictly positive and less than {max_input_tokens}. Given: {self.truncate}",
            ),
        ]
        for failed, message in rules:
            if failed:
                raise invalid(message)


def token_budget(n: int, max_new_tokens: int | None, max_input_tokens: int, max_total_tokens: int) -> int:
    """TGI's checks on the tokenized input; the new-token budget defaults to all that fits."""
    max_new = max_new_tokens if max_new_tokens is not None else max(max_total_tokens - n, 0)
    if n + max_new > max_total_tokens:
        raise invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total_tokens}. "
            f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`"
        )
    check_input_length(n, max_input_tokens)
    return max_new


def check_input_length(n: int, max_input_tokens: int) -> None:
    if n > max_input_tokens:
        raise invalid(f"`inputs` must have less than {max_input_tokens} tokens. Given: {n}")


class GenerateRequest(Strict):
    inputs: str
    parameters: GenerateParameters = Field(default_factory=GenerateParameters)


class CompatGenerateRequest(GenerateRequest):
    stream: bool = False


class Url(Strict):
    url: str


class TextChunk(Strict):
    type: Literal["text"]
    text: str


class ImageChunk(Strict):
    type: Literal["image_url"]
    image_url: Url


class Message(Strict):
    role: str
    content: str | list[Annotated[TextChunk | ImageChunk, Field(discriminator="type")]] | None = None
    tool_calls: list[dict] | None = None
    name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tool_call_form(cls, data):
        """In the spec's tool-call form of a message `content` is unconstrained; the tool calls are what count."""
        if isinstance(data, dict) and data.get("tool_calls") is not None:
            return {**data, "content": None}
        return data

    @model_validator(mode="after")
    def _has_body(self) -> Message:
        if self.content is None and self.tool_calls is None:
            raise ValueError("a message needs `content` or `tool_calls`")
        return self

    def text(self) -> str:
        """Flattened the way TGI feeds messages to a chat template: images become markdown links."""
        if self.content is None:
            return json.dumps(self.tool_calls)
        if isinstance(self.content, str):
            return self.content
        return "".join(c.text if isinstance(c, TextChunk) else f"![]({c.image_url.url})" for c in self.content)


class StreamOptions(Strict):
    include_usage: bool = False


class OpenAIRequest(Strict):
    """Fields that chat and completion requests share, mapped onto generate parameters as TGI maps them."""

    model: str | None = None
    frequency_penalty: float | None = None
    max_tokens: U32 | None = Field(None, validation_alias=AliasChoices("max_tokens", "max_completion_tokens"))
    seed: U64 | None = None
    stop: list[str] | None = None
    stream: bool = False
    temperature: float | None = None
    top_p: float | None = None

    def parameters(self, **extra: Any) -> GenerateParameters:
        greedy = self.temperature == 0.0  # TGI samples unless temperature is exactly 0
        return GenerateParameters(
            do_sample=not greedy,
            temperature=None if greedy else self.temperature,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty,
            max_new_tokens=self.max_tokens,
            seed=self.seed,
            stop=self.stop or [],
            details=True,
            **extra,
        )


class ChatRequest(OpenAIRequest):
    messages: list[Message]
    logit_bias: list[float] | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    n: U32 | None = None
    presence_penalty: float | None = None
    tools: list[dict] | None = None
    tool_prompt: str | None = None
    tool_choice: Any = "auto"
    response_format: GrammarType | None = None
    stream_options: StreamOptions | None = None

    def parameters(self, **extra: Any) -> GenerateParameters:
        penalty = None if self.presence_penalty is None else self.presence_penalty + 2.0  # TGI's mapping
        return super().parameters(
            repetition_penalty=penalty, top_n_tokens=self.top_logprobs, grammar=self.grammar(), **extra
        )

    def grammar(self) -> GrammarType | None:
        """The constraint to decode under: the response format. TGI would decode tools under a JSON grammar of
        their calls and answer `tool_calls`; this server has no tool calls, so it says so rather than answer text."""
        if self.response_format is not None and self.tools:
            raise ApiError(422, "Tool error: Grammar and tools are mutually exclusive", "tool_error")
        if self.tools and self.tool_choice != "none":
            raise invalid("tool calls are not supported")
        return self.response_format


class CompletionRequest(OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    repetition_penalty: float | None = None
    response_format: GrammarType | None = None  # not in TGI's completions (vLLM's has it): as in chat here
    suffix: str | None = None

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    def parameters(self, **extra: Any) -> GenerateParameters:
        return super().parameters(repetition_penalty=self.repetition_penalty, grammar=self.response_format, **extra)
