"""Pydantic request and response bodies of the OpenAI-compatible API (and llama.cpp's /infill).

They are the validation (a wrong type, a non-finite temperature, a 70-bit seed, a lone UTF-16
surrogate, a content part whose ``text`` is not a string: all 400 before anything is decoded)
and the published schema (``/openapi.json``). Unknown fields are ignored, as OpenAI's own
server does for fields a model does not use.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from codefoundry.infer.sampling import SEED_RANGE


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone UTF-16 surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Stop = Text | Annotated[list[Text], Field(max_length=4)] | None
Seed = Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])]


class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """Settings every generation endpoint shares."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    stop: Stop = None
    seed: Seed | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's extension: always run to max_tokens (benchmarks)")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(Sampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=8)] = 1
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    name: Text
    arguments: Text


class ToolCall(BaseModel):
    id: Text | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None


class FunctionSchema(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: Text
    description: Text | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionSchema


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    n: Annotated[int, Field(ge=1, le=8)] = 1
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=5)] | None = None


class InfillRequest(Sampling):
    prefix: Text | None = None
    suffix: Text | None = None
    input_prefix: Text | None = Field(None, description="llama.cpp's name for prefix")
    input_suffix: Text | None = Field(None, description="llama.cpp's name for suffix")


# --- responses ---------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "tool_calls"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Infill(BaseModel):
    content: str
    stop: bool = True
    finish_reason: FinishReason
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "shutting_down"]
    active_rows: int
    queue_depth: int


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
