"""The server on a tiny random checkpoint, through the official `openai` client and raw HTTP:
plain, streamed and image answers (tokens equal `Predictor`'s greedy output), 32 concurrent
clients, and every kind of bad input answered with a 4xx while the server keeps serving."""

import concurrent.futures
import json
import struct
import zlib

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from molmo_jax.generate import SamplingConfig  # noqa: E402
from molmo_jax.predictor import Predictor  # noqa: E402
from molmo_jax.serve.backend import ModelBackend  # noqa: E402
from tests.serve_helpers import data_url, free_port, png_bytes, running_server, tiny_checkpoint  # noqa: E402

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(checkpoint):
  return Predictor.from_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def server(predictor):
  # Batches of 1 or 8 rows only: every shape is compiled once for the whole module.
  with running_server(ModelBackend(predictor), max_body_bytes=MAX_BODY, max_tokens_limit=64,
                      engine_options=dict(max_batch=8, batch_sizes=[1], queue_size=8)) as served:
    yield served


@pytest.fixture(scope="module")
def client(server):
  url, _ = server
  return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)


def _image():
  return np.random.default_rng(0).integers(0, 255, (50, 70, 3), dtype=np.uint8)


def test_models_and_health(server, client):
  url, _ = server
  assert [m.id for m in client.models.list().data] == ["tiny"]
  health = httpx.get(url + "/health").json()
  assert health["status"] == "ok" and health["model"] == "tiny"


def test_plain_and_streamed_answers_agree(client):
  messages = [{"role": "user", "content": "What is in the picture?"}]
  plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8)
  choice = plain.choices[0]
  assert choice.finish_reason in ("stop", "length")
  assert plain.usage.completion_tokens == len(choice.model_extra["token_ids"]) > 0
  assert choice.message.model_extra["points"] == [] and choice.message.model_extra["image_size"] is None

  stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, stream=True,
                                          stream_options={"include_usage": True})
  chunks = list(stream)
  text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
  assert len(finals) == 1 and finals[0].finish_reason == choice.finish_reason
  assert finals[0].model_extra["token_ids"] == choice.model_extra["token_ids"]
  assert text == choice.message.content
  assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
  # Greedy decoding is deterministic, streamed piece by piece or not.
  assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 1


def test_image_answer_equals_predictor_greedy_output(client, predictor):
  image = _image()
  prompt = "Point to the cat"
  reference = predictor.predict([image], [prompt], sampling=SamplingConfig(max_new_tokens=12))[0]
  answer = client.chat.completions.create(
      model="tiny", max_tokens=12, temperature=0,
      messages=[{"role": "user", "content": [
          {"type": "text", "text": prompt},
          {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]}])
  choice = answer.choices[0]
  assert choice.model_extra["token_ids"] == reference.tokens
  assert choice.message.content == reference.text
  assert choice.message.model_extra["image_size"] == [70, 50]
  np.testing.assert_allclose(np.reshape(choice.message.model_extra["points"], (-1, 2)),
                             reference.points.round(2))


def test_stop_string_cuts_the_answer(client):
  messages = [{"role": "user", "content": "Describe"}]
  full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12).choices[0]
  text = full.message.content
  assert len(text) >= 3, text
  stop = text[len(text) // 2:len(text) // 2 + 2]
  cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop])
  assert cut.choices[0].finish_reason == "stop"
  assert cut.choices[0].message.content == text[:text.find(stop)].strip()


def test_32_concurrent_clients_succeed_or_get_a_clean_503(server):
  url, engine = server
  before = dict(engine.snapshot())

  def ask(i):
    response = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "messages": [{"role": "user", "content": f"Question number {i}?"}], "max_tokens": 4})
    return response.status_code, response.headers.get("retry-after"), response.json()

  with concurrent.futures.ThreadPoolExecutor(32) as pool:
    results = list(pool.map(ask, range(32)))
  ok = [body for status, _, body in results if status == 200]
  busy = [(retry, body) for status, retry, body in results if status == 503]
  assert len(ok) + len(busy) == 32, [r[:2] for r in results]
  assert ok, "every request was refused"
  for body in ok:
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
  for retry, body in busy:
    assert retry == "1" and body["error"]["code"] == "overloaded"
  after = engine.snapshot()
  # The requests that got in were decoded together, not one by one.
  batches = after["batches"] - before.get("batches", 0)
  assert batches < len(ok), (batches, len(ok))


def _bomb_png(width=30000, height=30000) -> bytes:
  """A valid PNG header announcing a huge image, with a tiny payload."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
          + chunk(b"IEND", b""))


def _image_request(url):
  return {"messages": [{"role": "user", "content": [
      {"type": "text", "text": "Point to the cat"}, {"type": "image_url", "image_url": {"url": url}}]}],
      "max_tokens": 4}


BAD_INPUTS = {
    "malformed JSON": (dict(content=b'{"messages": [', headers={"content-type": "application/json"}),
                       400, "invalid_json"),
    "not an object": (dict(json=[1, 2]), 400, "invalid_json"),
    "unknown field": (dict(json={"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}),
                      400, "extra_forbidden"),
    "unknown content part field": (dict(json={"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "colour": "red"}]}]}), 400, "extra_forbidden"),
    "no messages": (dict(json={"messages": []}), 400, None),
    "n=2": (dict(json={"messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, None),
    "non-image data": (dict(json=_image_request(data_url(b"hello, I am text", "image/png"))),
                       400, "invalid_image"),
    "text/plain data URL": (dict(json=_image_request(data_url(b"hello", "text/plain"))), 400,
                            "invalid_image"),
    "corrupt image": (dict(json=_image_request(data_url(png_bytes(_image())[:60]))), 400,
                      "invalid_image"),
    "decompression bomb": (dict(json=_image_request(data_url(_bomb_png()))), 400, "invalid_image"),
    "network image URL": (dict(json=_image_request("https://example.com/cat.png")), 400,
                          "unsupported_image_url"),
    "local path when disabled": (dict(json=_image_request("/etc/hostname")), 400,
                                 "unsupported_image_url"),
    "oversized body": (dict(json={"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]}),
                       413, "request_too_large"),
    "prompt longer than the context": (dict(json={"messages": [{"role": "user",
                                       "content": "cat " * 600}], "max_tokens": 4}),
                                       400, "context_length_exceeded"),
    "max_tokens zero": (dict(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
                        400, "invalid_value"),
    "max_tokens above the limit": (dict(json={"messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 65}), 400, "invalid_value"),
    "unknown model": (dict(json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
                      404, "model_not_found"),
    "temperature out of range": (dict(json={"messages": [{"role": "user", "content": "hi"}],
                                            "temperature": 5}), 400, None),
    "assistant turn last": (dict(json={"messages": [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "yo"}]}),
                            400, None),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(server, name):
  url, _ = server
  kwargs, status, code = BAD_INPUTS[name]
  response = httpx.post(url + "/v1/chat/completions", timeout=60, **kwargs)
  assert response.status_code == status, response.text
  error = response.json()["error"]
  assert error["message"] and error["type"]
  if code is not None:
    assert error["code"] == code, error
  good = httpx.post(url + "/v1/chat/completions", timeout=300, json={
      "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
  assert good.status_code == 200, good.text
  assert good.json()["choices"][0]["message"]["role"] == "assistant"


def test_unknown_route_is_an_openai_style_404(server):
  url, _ = server
  response = httpx.get(url + "/v1/nothing")
  assert response.status_code == 404 and "error" in response.json()


def test_command_line_startup_errors_are_one_line_exit_2(tmp_path, capsys):
  from molmo_jax import errors
  from molmo_jax.serve.__main__ import main
  assert errors.run_main(main, ["--checkpoint", str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--checkpoint" in err[0] and "does not exist" in err[0], err
  (tmp_path / "config.json").write_text("{}")
  assert errors.run_main(main, ["--checkpoint", str(tmp_path), "--max-batch", "0"]) == 2
  assert "--max-batch must be >= 1" in capsys.readouterr().err


def test_checkpoint_may_be_a_training_workdir(checkpoint, predictor, tmp_path, monkeypatch, capsys):
  """--checkpoint WORKDIR serves its latest checkpoint (or --step N); the answer is the model's."""
  import shutil

  import uvicorn
  from fastapi.testclient import TestClient

  from molmo_jax import errors
  from molmo_jax.serve.__main__ import main
  workdir = tmp_path / "run"
  for step in (2, 5):
    shutil.copytree(checkpoint / "params", workdir / "checkpoints" / str(step) / "params")
  shutil.copy(checkpoint / "config.json", workdir / "model_config.json")
  shutil.copytree(checkpoint / "tokenizer", workdir / "tokenizer")
  answers = []

  def fake_run(app, **kwargs):   # one request through the app main built, instead of listening
    with TestClient(app) as client:
      answers.append(client.post("/v1/chat/completions", json={
          "messages": [{"role": "user", "content": "What is this?"}], "max_tokens": 4}).json())
      answers.append(client.get("/v1/models").json())

  monkeypatch.setattr(uvicorn, "run", fake_run)
  assert main(["--checkpoint", str(workdir), "--port", str(free_port()), "--log-level", "error",
               "--max-batch", "1", "--default-max-tokens", "4"]) == 0
  reply, models = answers
  expected = predictor.predict([None], ["What is this?"], sampling=SamplingConfig(max_new_tokens=4))[0]
  assert reply["choices"][0]["token_ids"] == expected.tokens
  assert models["data"][0]["id"] == "run"
  capsys.readouterr()
  assert errors.run_main(main, ["--checkpoint", str(workdir), "--step", "3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "no checkpoint of step 3" in err[0] and "[2, 5]" in err[0], err


def test_batches_sharded_over_a_mesh_give_the_single_device_tokens(checkpoint, predictor):
  import threading

  from molmo_jax import sharding
  from molmo_jax.serve.engine import BatchingEngine, Finished, Job
  from molmo_jax.serve.messages import Conversation
  mesh = sharding.mesh_from_spec("data=2,fsdp=2,tensor=2")
  backend = ModelBackend(Predictor.from_checkpoint(checkpoint, mesh=mesh))
  assert backend.batch_multiple == 4     # the batch axis is sharded over data x fsdp (x expert)
  engine = BatchingEngine(backend, max_batch=4, batch_sizes=[4], batch_wait_s=0.2).start()
  prompts = ["What is this?", "Describe it", "Point to the cat"]
  results, finished = {}, threading.Event()

  def sink_for(prompt):
    def sink(event):
      if isinstance(event, Finished):
        results[prompt] = event.completion
        if len(results) == len(prompts):
          finished.set()
    return sink

  try:
    for prompt in prompts:
      prepared = backend.prepare(Conversation([prompt], None))
      engine.submit(Job(prepared, max_tokens=6, sink=sink_for(prompt)))
    assert finished.wait(600)
  finally:
    engine.stop()
  assert engine.snapshot()["batches"] == 1
  reference = predictor.predict([None] * 3, prompts, sampling=SamplingConfig(max_new_tokens=6))
  for prompt, expected in zip(prompts, reference):
    assert results[prompt].token_ids == expected.tokens, prompt


def test_mesh_spec_of_the_command_line():
  from molmo_jax import sharding
  assert dict(sharding.mesh_from_spec("fsdp=4").shape) == {"data": 2, "fsdp": 4, "tensor": 1, "expert": 1}
  assert dict(sharding.mesh_from_spec("auto").shape)["data"] == 8
  for bad in ("fsdp", "pipeline=2", "tensor=two", "data=3"):
    with pytest.raises(ValueError):
      sharding.mesh_from_spec(bad)
