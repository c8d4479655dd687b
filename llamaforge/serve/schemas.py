"""Request bodies of the OpenAI-compatible API, validated strictly: unknown fields and out-of-range values are
rejected with the field's name, so a client learns what to fix instead of getting a silently different answer.

Beyond OpenAI's fields the sampling extensions other open servers accept are supported: `top_k`, `min_p`,
`repetition_penalty` and `ignore_eos`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llamaforge.core.spec import ComponentSpec


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    n: int = Field(default=1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def samplers(self) -> list[ComponentSpec]:
        """OpenAI's knobs as a sampler pipeline: repetition_penalty -> temperature -> top_k -> top_p -> min_p;
        temperature 0 (or top_p 0) means greedy, as with OpenAI."""
        stages: list[ComponentSpec] = []
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            stages.append(ComponentSpec(name="repetition_penalty", params={"penalty": self.repetition_penalty}))
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature == 0 or self.top_p == 0 or self.top_k == 1:
            return [*stages, ComponentSpec(name="greedy")]
        if temperature != 1.0:
            stages.append(ComponentSpec(name="temperature", params={"temperature": temperature}))
        if self.top_k is not None:
            stages.append(ComponentSpec(name="top_k", params={"top_k": self.top_k}))
        if self.top_p is not None and self.top_p < 1:
            stages.append(ComponentSpec(name="top_p", params={"top_p": self.top_p}))
        if self.min_p:
            stages.append(ComponentSpec(name="min_p", params={"min_p": self.min_p}))
        return stages or [ComponentSpec(name="temperature", params={"temperature": 1.0})]

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for accepted-but-unimplemented settings."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported by this server; use repetition_penalty (e.g. 1.1) instead"
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        """One entry per choice: a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error shape, which the official clients turn into typed exceptions."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
