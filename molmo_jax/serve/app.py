"""The FastAPI application: OpenAI-compatible chat completions, models, health and the page.

  POST /v1/chat/completions   OpenAI chat schema (see protocol.py), `stream` for server-sent events
  GET  /v1/models             the one served model
  GET  /health                liveness plus queue/batch counters
  GET  /                      the page: drop an image, ask, see the answer streamed and the points

Every error is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}` with a 4xx
status for bad input (400 invalid request, 404 unknown model or route, 413 body too large), 503 +
Retry-After when the queue is full, 504 past the request timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import time
import uuid
from importlib import resources
from typing import Any, AsyncIterator

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from molmo_jax.serve import messages
from molmo_jax.serve.engine import (BatchingEngine, Completion, Delta, Failed, Finished, Job,
                                    timeout_error)
from molmo_jax.serve.protocol import APIError, ChatCompletionRequest, validation_error

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServeSettings:
  model_name: str
  max_body_bytes: int = 20 * 2**20
  default_max_tokens: int = 192
  max_tokens_limit: int = 1024
  request_timeout_s: float = 120.0
  local_image_dir: str | None = None
  prepare_threads: int = 2           # threads decoding images and building examples


def create_app(engine: BatchingEngine, settings: ServeSettings) -> FastAPI:
  """The app over a started engine; the engine is stopped when the app shuts down."""
  from contextlib import asynccontextmanager

  # Image decoding and example building hold the GIL for much of their time, so a few threads
  # (not anyio's default 40) keep up with the engine without thrashing the event loop's thread.
  prepare_pool = concurrent.futures.ThreadPoolExecutor(max(1, settings.prepare_threads),
                                                       thread_name_prefix="molmo-prepare")

  @asynccontextmanager
  async def lifespan(app):
    yield
    engine.stop()
    prepare_pool.shutdown(wait=False, cancel_futures=True)

  app = FastAPI(title="molmo_jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                openapi_url=None)
  app.state.engine = engine
  app.state.settings = settings
  created = int(time.time())
  page = resources.files("molmo_jax.serve").joinpath("page.html").read_text(encoding="utf-8")

  @app.exception_handler(APIError)
  async def _api_error(request: Request, error: APIError):
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

  @app.exception_handler(StarletteHTTPException)
  async def _http_error(request: Request, error: StarletteHTTPException):
    kind = "not_found" if error.status_code == 404 else "invalid_request_error"
    body = APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                    type=kind).body()
    return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

  @app.exception_handler(Exception)
  async def _unexpected(request: Request, error: Exception):
    _log.exception("unexpected error on %s", request.url.path)
    return JSONResponse(APIError(500, f"internal error: {type(error).__name__}: {error}",
                                 type="server_error").body(), status_code=500)

  @app.get("/", response_class=HTMLResponse)
  async def index():
    return HTMLResponse(page)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": settings.model_name, **engine.snapshot()}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{
        "id": settings.model_name, "object": "model", "created": created, "owned_by": "molmo_jax",
        "max_model_len": engine.backend.context_length}]}

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request):
    request_body = await _read_json(request, settings.max_body_bytes)
    try:
      chat = ChatCompletionRequest.model_validate(request_body)
    except pydantic.ValidationError as e:
      raise validation_error(e) from None
    if chat.model is not None and chat.model != settings.model_name:
      raise APIError(404, f"model {chat.model!r} is not served here; this server serves "
                     f"{settings.model_name!r}", param="model", code="model_not_found")
    loop = asyncio.get_running_loop()
    job = await loop.run_in_executor(prepare_pool, _make_job, engine, settings, chat)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    if not chat.stream:   # one event to wait for: the answer (or the error)
      job.stream = False
      answer = loop.create_future()

      def deliver(event):
        try:
          loop.call_soon_threadsafe(_settle, answer, event)
        except RuntimeError:  # loop closed
          job.cancel()

      job.sink = deliver
      engine.submit(job)
      try:
        completion = await _wait(request, job, answer)
      except _ClientGone:
        return Response(status_code=499)   # nobody reads it; the job was cancelled
      return _response(completion, completion_id, settings.model_name)

    events: asyncio.Queue = asyncio.Queue()

    def sink(event):
      try:
        loop.call_soon_threadsafe(events.put_nowait, event)
      except RuntimeError:  # loop closed
        job.cancel()

    job.sink = sink
    engine.submit(job)
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    return StreamingResponse(_stream(job, events, completion_id, settings.model_name, include_usage),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  return app


async def _read_json(request: Request, limit: int) -> Any:
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise APIError(413, f"request body of {int(declared)} bytes exceeds the server's limit of "
                   f"{limit} bytes (--max-body-mb)", code="request_too_large")
  chunks, size = [], 0
  async for chunk in request.stream():
    size += len(chunk)
    if size > limit:
      raise APIError(413, f"request body exceeds the server's limit of {limit} bytes "
                     "(--max-body-mb)", code="request_too_large")
    chunks.append(chunk)
  raw = b"".join(chunks)
  if not raw:
    raise APIError(400, "empty request body; expected a JSON object", code="invalid_json")
  try:
    body = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
  if not isinstance(body, dict):
    raise APIError(400, f"request body must be a JSON object, got {type(body).__name__}",
                   code="invalid_json")
  return body


def _make_job(engine: BatchingEngine, settings: ServeSettings, chat: ChatCompletionRequest) -> Job:
  """Decodes the image and builds the model example (in a worker thread: CPU work)."""
  conversation = messages.parse_messages(chat.messages, local_image_dir=settings.local_image_dir)
  backend = engine.backend
  prepared = backend.prepare(conversation)
  context = backend.context_length
  room = context - prepared.prompt_tokens
  if room < 1:
    raise APIError(400, f"the prompt is {prepared.prompt_tokens} tokens (image tokens included); "
                   f"this model's context is {context} tokens", param="messages",
                   code="context_length_exceeded")
  requested = chat.requested_max_tokens()
  param = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
  if requested is None:
    max_tokens = min(settings.default_max_tokens, room)
  elif not 1 <= requested <= settings.max_tokens_limit:
    raise APIError(400, f"{param} must be between 1 and {settings.max_tokens_limit}, got "
                   f"{requested}", param=param, code="invalid_value")
  elif requested > room:
    raise APIError(400, f"the prompt is {prepared.prompt_tokens} tokens and {param} is "
                   f"{requested}: together more than this model's context of {context} tokens",
                   param=param, code="context_length_exceeded")
  else:
    max_tokens = requested
  return Job(prepared, max_tokens, temperature=chat.temperature, top_p=chat.top_p,
             top_k=chat.top_k, seed=chat.seed, stop=tuple(chat.stop or ()), timeout_s=settings.request_timeout_s)


class _ClientGone(Exception):
  pass


async def _next_event(job: Job, events: asyncio.Queue):
  """The streamed job's next event; past its deadline the job is cancelled."""
  while True:
    remaining = job.deadline - time.monotonic()
    if remaining <= 0:
      job.cancel()
      raise timeout_error(job)
    try:
      return await asyncio.wait_for(events.get(), timeout=min(remaining, 0.5))
    except asyncio.TimeoutError:
      pass


def _settle(answer: asyncio.Future, event: Any) -> None:
  if not answer.done():
    answer.set_result(event)


async def _wait(request: Request, job: Job, answer: asyncio.Future) -> Completion:
  """The non-streamed job's answer; a timeout or a client disconnect cancels the job."""
  try:
    while True:
      remaining = job.deadline - time.monotonic()
      if remaining <= 0:
        raise timeout_error(job)
      settled, _ = await asyncio.wait((answer,), timeout=min(remaining, 0.5))
      if settled:
        event = answer.result()
        if isinstance(event, Failed):
          raise event.error
        return event.completion
      if await request.is_disconnected():
        raise _ClientGone()
  finally:
    if not job.finished.is_set():
      job.cancel()


def _extras(completion: Completion) -> dict[str, Any]:
  return {"points": completion.points, "count": completion.count,
          "image_size": list(completion.image_size) if completion.image_size else None}


def _usage(completion: Completion) -> dict[str, int]:
  generated = len(completion.token_ids)
  return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": generated,
          "total_tokens": completion.prompt_tokens + generated}


def _response(completion: Completion, completion_id: str, model: str) -> JSONResponse:
  return JSONResponse({
      "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
      "choices": [{"index": 0, "finish_reason": completion.finish_reason,
                   "message": {"role": "assistant", "content": completion.text, **_extras(completion)},
                   "logprobs": None, "token_ids": completion.token_ids}],
      "usage": _usage(completion)})


async def _stream(job: Job, events: asyncio.Queue, completion_id: str, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
  created = int(time.time())

  def chunk(choices, **extra) -> str:
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": choices, **extra}
    return f"data: {json.dumps(body)}\n\n"

  try:
    yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    while True:
      try:
        event = await _next_event(job, events)
      except APIError as error:
        event = Failed(error)
      if isinstance(event, Delta):
        yield chunk([{"index": 0, "delta": {"content": event.text}, "finish_reason": None}])
      elif isinstance(event, Finished):
        done = event.completion
        yield chunk([{"index": 0, "delta": _extras(done), "finish_reason": done.finish_reason,
                      "token_ids": done.token_ids}])
        if include_usage:
          yield chunk([], usage=_usage(done))
        yield "data: [DONE]\n\n"
        return
      elif isinstance(event, Failed):
        yield f"data: {json.dumps(event.error.body())}\n\n"
        return
  finally:
    if not job.finished.is_set():
      job.cancel()
