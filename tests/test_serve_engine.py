"""The batching engine and the HTTP layer on a scripted backend (known answers, controllable
speed): batching, streaming with stop strings, cancellation when a client disconnects,
timeouts, the bounded queue, points and counts in the answer."""

import concurrent.futures
import json
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")

from molmo_jax.serve.engine import stated_count  # noqa: E402
from tests.serve_helpers import (ScriptedBackend, data_url, demo_tokenizer_dir, png_bytes,  # noqa: E402
                                 running_server)

POINT = '<point x="20.0" y="40.0" alt="cat">cat</point>'


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  return demo_tokenizer_dir(tmp_path_factory.mktemp("tok"))


def _ask(url, content, **extra):
  return httpx.post(url + "/v1/chat/completions", timeout=60,
                    json={"messages": [{"role": "user", "content": content}], **extra})


def _sse(response):
  events = []
  for line in response.iter_lines():
    if line.startswith("data: "):
      events.append(line[6:])
  return events


def test_points_in_pixels_of_the_original_image_and_no_count(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: POINT)
  image = np.zeros((50, 70, 3), np.uint8)
  with running_server(backend) as (url, _):
    body = _ask(url, [{"type": "text", "text": "Point to the cat"},
                      {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]).json()
  message = body["choices"][0]["message"]
  assert message["content"] == POINT
  assert message["points"] == [[14.0, 20.0]] and message["image_size"] == [70, 50]
  assert message["count"] is None


def test_count_only_for_counting_answers():
  assert stated_count("Counting the <points x1=\"1.0\" y1=\"2.0\" alt=\"a\">a</points> shows a total of 1.") == 1
  assert stated_count("There are none.") == 0
  assert stated_count("3") == 3
  assert stated_count("A photo taken in 2020") is None


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: f"answer {p.prompt_tokens}", step_delay_s=0.02)
  with running_server(backend, engine_options=dict(max_batch=16, batch_wait_s=0.05)) as (url, engine):
    prompts = ["a b", "a b c d e f g h", "x"] * 8
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      bodies = list(pool.map(lambda p: _ask(url, p).json(), prompts))
    stats = engine.snapshot()
  for body in bodies:
    usage = body["usage"]
    assert body["choices"][0]["message"]["content"] == f"answer {usage['prompt_tokens']}"
  assert stats["completed"] == 24
  assert max(backend.started_batches) > 1, backend.started_batches
  assert stats["batches"] < 24


def test_streamed_pieces_add_up_to_the_answer_cut_at_the_stop_string(tokenizer_dir):
  answer = "one two three STOP four five"
  backend = ScriptedBackend(tokenizer_dir, lambda p: answer)
  with running_server(backend) as (url, _):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "count"}], "stream": True, "stop": ["STOP"]}) as r:
      assert r.headers["content-type"].startswith("text/event-stream")
      events = _sse(r)
    plain = _ask(url, "count", stop="STOP").json()["choices"][0]
  assert events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
  assert text == "one two three" == plain["message"]["content"]
  assert "STOP" not in "".join(e for e in events)
  assert chunks[-1]["choices"][0]["finish_reason"] == "stop" == plain["finish_reason"]
  assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 3


def test_a_client_that_disconnects_mid_stream_cancels_its_generation(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: " ".join(["word"] * 200), step_delay_s=0.05)
  with running_server(backend, max_tokens_limit=400) as (url, engine):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "talk"}], "stream": True, "max_tokens": 300}) as r:
      pieces = 0
      for line in r.iter_lines():
        pieces += '"content": "' in line and '"content": ""' not in line
        if pieces == 3:
          break   # leave after three streamed pieces
    deadline = time.monotonic() + 20
    while engine.snapshot().get("cancelled", 0) < 1 and time.monotonic() < deadline:
      time.sleep(0.05)
    stats = engine.snapshot()
    assert stats.get("cancelled", 0) == 1, stats
    assert stats["decode_steps"] < 150, stats       # stopped long before its 300 tokens
    assert _ask(url, "again", max_tokens=3).status_code == 200


def test_a_request_past_its_timeout_gets_504_and_the_server_goes_on(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: " ".join(["word"] * 100), step_delay_s=0.05)
  with running_server(backend, request_timeout_s=0.5, max_tokens_limit=200) as (url, engine):
    response = _ask(url, "talk", max_tokens=150)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "timeout"
    fast = _ask(url, "hi", max_tokens=2)
    assert fast.status_code == 200
    assert engine.snapshot()["decode_steps"] < 100


def test_full_queue_answers_503_with_retry_after(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: "a b c d e f", step_delay_s=0.05)
  options = dict(max_batch=1, queue_size=2, batch_wait_s=0.0)
  with running_server(backend, engine_options=options) as (url, engine):
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      responses = list(pool.map(lambda i: _ask(url, f"q{i}"), range(12)))
    codes = sorted(r.status_code for r in responses)
    assert set(codes) == {200, 503}, codes
    for r in responses:
      if r.status_code == 503:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"
    assert engine.snapshot()["rejected"] == codes.count(503)
    assert _ask(url, "after").status_code == 200


def test_local_images_only_inside_the_allowed_folder(tokenizer_dir, tmp_path):
  allowed = tmp_path / "images"
  allowed.mkdir()
  (allowed / "cat.png").write_bytes(png_bytes(np.zeros((40, 60, 3), np.uint8)))
  (tmp_path / "secret.png").write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
  backend = ScriptedBackend(tokenizer_dir, lambda p: POINT)
  with running_server(backend, local_image_dir=str(allowed)) as (url, _):
    def ask(path):
      return _ask(url, [{"type": "text", "text": "Point"}, {"type": "image_url", "image_url": {"url": path}}])
    ok = ask(str(allowed / "cat.png"))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["image_size"] == [60, 40]
    assert ask("file://" + str(allowed / "cat.png")).status_code == 200
    outside = ask(str(tmp_path / "secret.png"))
    assert outside.status_code == 400 and "outside" in outside.json()["error"]["message"]
    assert ask(str(allowed / "../secret.png")).status_code == 400


def test_warmup_runs_every_batch_size_and_decode_length_before_serving(tokenizer_dir):
  from molmo_jax.serve.engine import BatchingEngine
  backend = ScriptedBackend(tokenizer_dir, lambda p: "ok")
  seen = []
  start = backend.start

  def recording_start(inputs, rows, steps, sampling, seeds):
    run = start(inputs, rows, steps, sampling, seeds)
    step = run.step

    def recording_step(done, remaining, chunk):
      seen.append((inputs[0].crop_slots > 1, rows, steps, sampling.max_new_tokens,
                   sampling.temperature, chunk))
      return step(done, remaining, chunk)

    run.step = recording_step
    return run

  backend.start = recording_start
  engine = BatchingEngine(backend, max_batch=4, step_bucket=32)
  assert engine.warmup(max_tokens=[5, 40, 64]) == 2 * 2 * 3
  # Streamed and unstreamed batches decode chunks of different lengths: both compile.
  chunks = (backend.decode_chunk, backend.quiet_chunk)
  assert chunks[0] != chunks[1]
  expected = {(image, rows, steps, steps, 0.0, chunk) for image in (False, True)
              for rows in (1, 2, 4) for steps in (32, 64) for chunk in chunks}
  assert set(seen) == expected and len(seen) == len(expected)
  assert "completed" not in engine.snapshot()    # warm-up batches are not requests


def test_only_batches_with_a_streamed_request_decode_in_short_chunks(tokenizer_dir):
  backend = ScriptedBackend(tokenizer_dir, lambda p: "fine thanks")
  batches = []   # the chunk length of every decode call, per batch
  start = backend.start

  def recording_start(inputs, rows, steps, sampling, seeds):
    run = start(inputs, rows, steps, sampling, seeds)
    step = run.step

    def recording_step(done, remaining, chunk):
      batches[-1].append(chunk)
      return step(done, remaining, chunk)

    run.step = recording_step
    batches.append([])
    return run

  backend.start = recording_start
  with running_server(backend) as (url, _):
    plain = _ask(url, "How are you?").json()
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"messages": [{"role": "user", "content": "How are you?"}],
                            "stream": True}) as response:
      events = _sse(response)
  assert plain["choices"][0]["message"]["content"] == "fine thanks"
  pieces = [json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1]]
  assert "".join(pieces) == "fine thanks" and events[-1] == "[DONE]"
  assert backend.quiet_chunk != backend.decode_chunk
  assert [set(chunks) for chunks in batches] == [{backend.quiet_chunk}, {backend.decode_chunk}]
