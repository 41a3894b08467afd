"""Chat messages -> Molmo conversation turns and the bytes (or file) of at most one image.

Images come as `data:` URLs (base64) or, only when the server was started with a local image
folder, as file paths / `file://` URLs inside that folder. Nothing is ever fetched over the
network. The backend decodes the image with `molmo_jax.preprocess.inputs.load_pixels` (EXIF
orientation, strict decompression-bomb limit), so points come back in pixels of the image as the
user sees it.

Molmo has no system prompt: system/developer text is put before the first user turn. Consecutive
messages of one role are joined with a newline; the conversation must end with a user turn.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

from molmo_jax.serve.protocol import APIError, ImagePart, Message, TextPart

_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(;[^;,]*)*),(?P<data>.*)", re.DOTALL)


@dataclasses.dataclass
class ImageSource:
  data: bytes | Path           # the encoded image, or a file inside the allowed folder
  param: str                   # where it was in the request, e.g. messages.0.content.1.image_url.url


@dataclasses.dataclass
class Conversation:
  turns: list[str]             # user, assistant, user, ... ending with a user turn
  image: ImageSource | None


def parse_messages(messages: Sequence[Message], *, local_image_dir: str | os.PathLike | None = None
                   ) -> Conversation:
  system: list[str] = []
  turns: list[tuple[str, str]] = []
  image = None
  for index, message in enumerate(messages):
    param = f"messages.{index}"
    parts = ([TextPart(type="text", text=message.content)] if isinstance(message.content, str)
             else message.content)
    texts = []
    for k, part in enumerate(parts):
      if isinstance(part, ImagePart):
        if message.role != "user":
          raise APIError(400, f"{param}.content.{k}: only user messages may carry images",
                         param=f"{param}.content.{k}")
        if image is not None:
          raise APIError(400, f"{param}.content.{k}: a second image; Molmo answers about one "
                         "image per request (points are relative to it)", param=f"{param}.content.{k}")
        url_param = f"{param}.content.{k}.image_url.url"
        image = ImageSource(image_source(part.image_url.url, param=url_param,
                                         local_image_dir=local_image_dir), url_param)
      else:
        texts.append(part.text)
    text = " ".join(t.strip() for t in texts if t.strip())
    if message.role in ("system", "developer"):
      if turns:
        raise APIError(400, f"{param}: a {message.role} message must come before the conversation",
                       param=param)
      system.append(text)
      continue
    role = "user" if message.role == "user" else "assistant"
    if turns and turns[-1][0] == role:
      turns[-1] = (role, "\n".join(t for t in (turns[-1][1], text) if t))
    else:
      turns.append((role, text))
  if not turns or turns[0][0] != "user":
    raise APIError(400, "messages: the conversation must start with a user message", param="messages")
  if turns[-1][0] != "user":
    raise APIError(400, "messages: the last message must be a user message to answer",
                   param="messages")
  if system:
    turns[0] = ("user", "\n".join([*system, turns[0][1]]).strip())
  for k, (role, text) in enumerate(turns):
    if role == "user" and not text and not (k == 0 and image is not None):
      raise APIError(400, "messages: a user message has no text", param="messages")
  return Conversation([text for _, text in turns], image)


def image_source(url: str, *, param: str, local_image_dir: str | os.PathLike | None) -> bytes | Path:
  """The bytes of a `data:` URL or, when allowed, a local file path; APIError 400 otherwise."""
  if url.startswith("data:"):
    return _data_url_bytes(url, param)
  if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", url) and not url.startswith("file://"):
    raise APIError(400, f"{param}: this server never fetches images over the network; send the "
                   "image inline as a data: URL (base64)", param=param, code="unsupported_image_url")
  return _local_path(url, param, local_image_dir)


def _data_url_bytes(url: str, param: str) -> bytes:
  match = _DATA_URL.fullmatch(url)
  if not match:
    raise APIError(400, f"{param}: malformed data: URL", param=param, code="invalid_image")
  mime = match.group("mime").strip().lower()
  if mime and not mime.startswith("image/"):
    raise APIError(400, f"{param}: data: URL of type {mime!r}, expected an image/* type",
                   param=param, code="invalid_image")
  if "base64" not in [p.strip().lower() for p in match.group("params").split(";")]:
    raise APIError(400, f"{param}: data: URLs must be base64 encoded (data:image/png;base64,...)",
                   param=param, code="invalid_image")
  try:
    return base64.b64decode(match.group("data"), validate=True)
  except (binascii.Error, ValueError) as e:
    raise APIError(400, f"{param}: invalid base64 in data: URL ({e})", param=param,
                   code="invalid_image") from e


def _local_path(url: str, param: str, local_image_dir: str | os.PathLike | None) -> Path:
  if local_image_dir is None:
    raise APIError(400, f"{param}: local image paths are disabled; start the server with "
                   "--local-images DIR to allow files inside DIR, or send a data: URL",
                   param=param, code="unsupported_image_url")
  path = Path(url[len("file://"):] if url.startswith("file://") else url)
  root = Path(local_image_dir).resolve()
  resolved = (root / path).resolve() if not path.is_absolute() else path.resolve()
  if not resolved.is_relative_to(root):
    raise APIError(400, f"{param}: {str(path)!r} is outside the allowed image folder", param=param,
                   code="unsupported_image_url")
  if not resolved.is_file():
    raise APIError(400, f"{param}: no such image file {str(path)!r}", param=param,
                   code="invalid_image")
  return resolved
