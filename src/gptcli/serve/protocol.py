"""The OpenAI API's request bodies and error shape, as gptcli serves them.

Bodies are validated with pydantic in strict mode (a string is not a number, a number is
not a boolean); fields the server does not know are ignored, as OpenAI-speaking tools send
many. Fields that would change the answer but are not implemented (logprobs, echo,
penalties, ...) are refused by name rather than ignored. Every refusal is an `ApiError`,
answered as OpenAI answers: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gptcli.errors import shorten
from gptcli.infer.session import MAX_SEED

MAX_STOPS = 4  # OpenAI's limit


class ApiError(Exception):
    """A request the server refuses: HTTP `status` and OpenAI's error object."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: only plain text is produced (no JSON mode or schema)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str


class _Sampling(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None  # the served model's id (any other is refused); omitted: that model
    max_tokens: int | None = None  # each request kind sets its default
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens; wins when both are given
    temperature: float = 1.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int | None = None  # not OpenAI's; llama.cpp's and vLLM's servers take it too
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values: anything else would change the answer.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None  # chat: a boolean; completions: how many (0 still asks for some)
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def budget(self) -> int | None:
        """The most tokens to generate (None: the rest of the context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self, max_n: int) -> None:
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ApiError(400, f"{name} must be at least 1, got {value}", name)
        if not math.isfinite(self.temperature) or not 0 <= self.temperature <= 2:
            raise ApiError(400, f"temperature must be between 0 and 2, got {self.temperature}", "temperature")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise ApiError(400, f"top_k must be at least 1, got {self.top_k}", "top_k")
        if not 1 <= self.n <= max_n:
            raise ApiError(400, f"n must be between 1 and {max_n} (the server's --max-batch), got {self.n}", "n")
        stops = self.stops()
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ApiError(400, f"stop takes at most {MAX_STOPS} non-empty strings", "stop")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ApiError(400, f"seed must be between 0 and 2**64 - 1, got {self.seed}", "seed")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported; leave it at 0", name)
        if self.logit_bias:
            raise ApiError(400, "logit_bias is not supported; leave it out", "logit_bias")
        # `is not` rather than truthiness: logprobs 0 asks for the sampled tokens' log-probabilities.
        if self.logprobs is not None and self.logprobs is not False:
            raise ApiError(400, "logprobs is not supported; leave it out", "logprobs")
        if self.top_logprobs:
            raise ApiError(400, "top_logprobs is not supported; leave it out", "top_logprobs")
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(400, f"response_format {shorten(self.response_format.type)!r} is not supported; "
                                f"only plain text is (leave it out)", "response_format")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    prompt: str | list[str] = ""  # "": start a new document
    max_tokens: int | None = 16  # OpenAI's default; None: the rest of the context
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        if isinstance(self.prompt, list) and not self.prompt:
            raise ApiError(400, "prompt must not be an empty list", "prompt")
        if self.echo:
            raise ApiError(400, "echo is not supported; leave it out", "echo")
        if self.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported; leave it out", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix is not supported; leave it out", "suffix")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # OpenAI's participant name; chat templates have no place for it
    tool_calls: list | None = None  # an assistant's earlier tool calls: refused, as tools are

    def as_turn(self) -> dict:
        """{"role", "content"} as chat templates take it; developer is OpenAI's newer name
        for system, and text parts are joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None  # None: the rest of the context
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None  # the deprecated form of tools
    function_call: str | dict | None = None

    def check(self, max_n: int) -> None:
        super().check(max_n)
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ApiError(400, f"{name} are not supported; leave them out", name)
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ApiError(400, f"{name} is not supported (no tools are); leave it out", name)
        for i, message in enumerate(self.messages):
            if message.tool_calls:
                raise ApiError(400, f"messages[{i}].tool_calls: tool calls are not supported; leave them out",
                               "messages")


class ClassifyRequest(BaseModel):
    """POST /v1/classify (gptcli's own): `input` is one text or a list of them."""

    model_config = ConfigDict(strict=True, extra="ignore")
    model: str | None = None
    input: str | list[str]

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check(self) -> None:
        if isinstance(self.input, list) and not self.input:
            raise ApiError(400, "input must not be an empty list", "input")


def parse(kind: type[BaseModel], data: object) -> BaseModel:
    """`data` (decoded JSON) as a request of `kind`, or an ApiError naming the first field
    that is wrong and what it should be."""
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = _field_path(error["loc"])
        param = str(error["loc"][0]) if error["loc"] else None
        if error["type"] == "missing":
            raise ApiError(400, f"'{field}' is required", param) from None
        raise ApiError(400, f"'{field}': {error['msg'].lower()}"
                       f"{_choices_hint(kind, error['loc'])}", param) from None


def _field_path(loc: tuple) -> str:
    """`messages.0.content` from pydantic's location, without the names it gives union
    branches (`str`, `list[str]`, `TextPart`): those are types, not fields."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or p in _FIELDS)


def _choices_hint(kind: type[BaseModel], loc: tuple) -> str:
    """For a field that takes a union (a string or a list of strings), say so."""
    unions = {"prompt": "a string or a list of strings", "stop": "a string or a list of up to 4 strings",
              "input": "a string or a list of strings", "content": "a string or a list of text parts"}
    name = next((str(p) for p in reversed(loc) if str(p) in unions), None)
    return f" (it takes {unions[name]})" if name else ""


_FIELDS = {name for kind in (CompletionRequest, ChatRequest, ClassifyRequest, Message, TextPart, StreamOptions,
                              ResponseFormat)
           for name in kind.model_fields}
