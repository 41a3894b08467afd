"""The OpenAI chat-completions schema the server accepts and the error body it answers with.

Requests are validated strictly: an unknown field is an error (HTTP 400 naming the field), not
silently ignored, so a client never believes a setting took effect when it did not.

Departures from OpenAI's schema: `temperature` defaults to 0 (greedy, as `predict`: Molmo's points
are read from its most likely answer); `top_k` is accepted; the answer message (and the last
streamed delta) carries `points` ([K, 2] pixels of the original image), `count` (the number a
counting answer states, else null) and `image_size` ([w, h]); each choice carries `token_ids`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
  """An error answered as HTTP `status` with an OpenAI-style body
  `{"error": {"message", "type", "param", "code"}}`."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
               param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None):
    super().__init__(message)
    self.status = status
    self.message = message
    self.type = type
    self.param = param
    self.code = code
    self.headers = headers or {}

  def body(self) -> dict[str, Any]:
    return {"error": {"message": self.message, "type": self.type, "param": self.param,
                      "code": self.code}}


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class ImageURL(_Strict):
  url: str
  detail: Literal["auto", "low", "high"] | None = None


class TextPart(_Strict):
  type: Literal["text"]
  text: str


class ImagePart(_Strict):
  type: Literal["image_url"]
  image_url: ImageURL


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
  role: Literal["system", "developer", "user", "assistant"]
  content: Union[str, list[ContentPart]]
  name: str | None = None


class StreamOptions(_Strict):
  include_usage: bool = False


class ChatCompletionRequest(_Strict):
  model: str | None = None
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = None
  max_completion_tokens: int | None = None
  temperature: float = Field(0.0, ge=0.0, le=2.0)   # greedy by default, as `predict`
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0)
  seed: int | None = None
  stop: Union[str, list[str], None] = None
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  user: str | None = None

  @pydantic.field_validator("n")
  @classmethod
  def _one_choice(cls, n: int) -> int:
    if n != 1:
      raise ValueError("only n=1 is supported")
    return n

  @pydantic.field_validator("stop")
  @classmethod
  def _stops(cls, stop):
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
      raise ValueError("at most 4 stop strings")
    if any(not s for s in stops):
      raise ValueError("stop strings must not be empty")
    return stops

  def requested_max_tokens(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_error(error: pydantic.ValidationError) -> APIError:
  """The most specific problem of a failed validation as one 400 naming the field (dotted path):
  an unknown field first, else the deepest location (for `content`, a list of parts is what the
  client meant when it sent a list)."""
  first = min(error.errors(), key=lambda e: (e.get("type") != "extra_forbidden", -len(e.get("loc", ()))))
  loc, drop = [], set()
  parts = [str(part) for part in first.get("loc", ())]
  for i, part in enumerate(parts):
    # Union branch markers are pydantic's, not the client's: "str", "list[...]", and the tag
    # that follows the list index of a tagged union.
    if part.startswith("list[tagged-union["):
      drop.add(i + 2)
    if i in drop or part == "str" or part.startswith(("list[", "function-after", "tagged-union[")):
      continue
    loc.append(part)
  param = ".".join(loc) or None
  kind = first.get("type", "")
  if kind == "extra_forbidden":
    message = f"unknown field {param!r}; this server does not support it"
  elif kind == "missing":
    message = f"{param}: field required"
  else:
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid")
  return APIError(400, message, param=param, code=kind or None)
