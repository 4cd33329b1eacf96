"""The one parser of OpenAI request bodies, for both servers (cascade and single-stage).

What it settles, so that the two servers accept and refuse the same things with the same words
(docs/SERVING.md has the table of fields):

- explicit `null` is the same as leaving a field out (OpenAI clients send `"n": null`);
- message content is a string or a list of parts; text parts are joined with newlines, a part of
  any other type (image, audio, file) is a 400 naming where it is;
- what a greedy confidence cascade cannot do is a 400 naming the field, never a silent 200:
  tools / functions, a `response_format` other than text, `n` > 1, `logit_bias`;
- `stream_options` only with `stream`, `top_logprobs` only with `logprobs`.

Decoding is greedy everywhere: `temperature`, `top_p`, `seed`, the penalties and `user` are
accepted and have no effect.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cascade_core.server.common import ApiError, validate_body

MAX_NEW_TOKENS = 1024
LINE_BREAK = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")  # what str.splitlines() splits on
MAX_TOP_LOGPROBS = 20
NOT_SUPPORTED = "not supported by a confidence cascade"


def _drop_nulls(data: Any) -> Any:
    """Top-level `null` values mean 'not given' (OpenAI's own clients send them)."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None}
    return data


def content_text(content: Any, where: str) -> str:
    """A message's content as plain text: a string, or the `text` parts of a list joined by newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must be a string or a list of content parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ValueError(f"{at} must be an object like {{\"type\": \"text\", \"text\": \"...\"}}")
        kind = part.get("type")
        if kind != "text":
            raise ValueError(f"{at} has type {kind!r}: only text parts are accepted ({NOT_SUPPORTED})")
        text = part.get("text")
        if not isinstance(text, str):
            raise ValueError(f"{at}.text must be a string, got {'null' if text is None else type(text).__name__}")
        texts.append(text)
    return "\n".join(texts)


class ChatMessage(BaseModel):
    """One chat message; `content` is kept as plain text (see `content_text`)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str = ""

    @model_validator(mode="before")
    @classmethod
    def _text_content(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, "content": content_text(data.get("content"), "content")}
        return data

    def text(self) -> str:
        return self.content


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(default=False, strict=True)


class _Request(BaseModel):
    """Fields both endpoints of both servers share."""

    model_config = ConfigDict(extra="ignore")

    # Strict types: `"max_tokens": "5"`, `true` or `"stream": "yes"`, `1` are 400s, not silent
    # conversions (issue 23); numbers for temperature/top_p may still be integers.
    model: str | None = Field(default=None, min_length=1, strict=True)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS, strict=True)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)  # accepted; decoding is greedy
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)  # accepted; decoding is greedy
    n: int = Field(default=1, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data: Any) -> Any:
        return _drop_nulls(data)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS, strict=True)
    logprobs: bool = Field(default=False, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    response_format: dict | None = None
    tools: list | None = None
    functions: list | None = None
    tool_choice: str | dict | None = None
    function_call: str | dict | None = None
    # Extra fields of the cascade server (docs/SERVING.md): the options of a multiple-choice
    # question, and the subject named in the prompt's header.
    options: list[str] | None = None
    subject: str = ""

    @field_validator("options")
    @classmethod
    def _one_line_options(cls, value: list[str] | None) -> list[str] | None:
        """An option is one line: a line break inside one would put a second "B." line in the
        prompt, a question the stages were never calibrated on."""
        for i, option in enumerate(value or ()):
            if LINE_BREAK.search(option):
                raise ValueError(f"option {i} ({option[:20]!r}) holds a line break: an option is one line")
        return value

    @field_validator("subject")
    @classmethod
    def _one_line_subject(cls, value: str) -> str:
        if LINE_BREAK.search(value):
            raise ValueError("the subject holds a line break: it is one line of the prompt's header")
        return value

    @field_validator("messages", mode="before")
    @classmethod
    def _name_the_message(cls, value: Any) -> Any:
        """Content errors name the message they are in (`messages[2].content[0]`)."""
        if isinstance(value, list):
            for i, message in enumerate(value):
                if isinstance(message, dict):
                    if message.get("content") is None and message.get("role") in ("user", "system", "developer"):
                        raise ValueError(f"messages[{i}].content is missing: a {message['role']} message needs "
                                         "content (a string or a list of text parts)")
                    content_text(message.get("content"), f"messages[{i}].content")
        return value

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS, strict=True)
    echo: bool = Field(default=False, strict=True)


def check_common(req: _Request) -> None:
    """What neither server does, whichever endpoint: a 400 naming the field."""
    if req.n != 1:
        raise ApiError(400, f"n={req.n}: only n=1 is supported (decoding is greedy)", param="n")
    if req.logit_bias:
        raise ApiError(400, f"logit_bias is {NOT_SUPPORTED} (its P(T) would no longer be the model's)",
                       param="logit_bias")
    if req.stream_options is not None and not req.stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options")
    stop = req.stop_list()
    if any(not isinstance(s, str) or not s for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be up to 4 non-empty strings", param="stop")


def check_chat(req: ChatRequest) -> None:
    """The chat checks both servers share (tools, response format, logprobs pairing)."""
    check_common(req)
    for name in ("tools", "functions"):
        if getattr(req, name):
            raise ApiError(400, f"{name} is {NOT_SUPPORTED}: the answer is the model's text, with no tool calls",
                           param=name)
    for name in ("tool_choice", "function_call"):
        value = getattr(req, name)
        if value is not None and value not in ("none", "auto"):
            raise ApiError(400, f"{name}={value!r} is {NOT_SUPPORTED} (no tools can be called)", param=name)
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise ApiError(400, f"response_format type {req.response_format.get('type')!r} is {NOT_SUPPORTED}: "
                            "only {\"type\": \"text\"}", param="response_format")
    if req.top_logprobs and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def parse_chat(data: dict) -> ChatRequest:
    req = validate_body(ChatRequest, data)
    check_chat(req)
    return req


def parse_completion(data: dict) -> CompletionRequest:
    req = validate_body(CompletionRequest, data)
    check_common(req)
    if req.echo:
        raise ApiError(400, "echo=true is not supported", param="echo")
    return req
