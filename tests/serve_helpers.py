"""Helpers for the server tests: a tiny model directory, a server on a free loopback port, and a
scripted backend that answers with known text (so the page and the engine are tested against
known points without depending on what a random model says)."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from molmo_jax import config as C
from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
from molmo_jax.models.molmo import Molmo, example_batch_shapes
from molmo_jax.preprocess.tokens import MolmoTokenizer
from molmo_jax.serve.app import ServeSettings, create_app
from molmo_jax.serve.backend import ModelBackend
from molmo_jax.serve.engine import BatchingEngine
from molmo_jax.model_dir import save_model_checkpoint

VOCAB = 448


def tiny_config():
  return C.tiny("qwen2", vocab_size=VOCAB, embedding_size=VOCAB)


def tiny_checkpoint(root: Path) -> Path:
  """A random-weight tiny Qwen2-family Molmo with the demo tokenizer, saved as a model directory."""
  cfg = tiny_config()
  save_demo_tokenizer(root / "tokenizer", build_demo_tokenizer(vocab_size=VOCAB))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  return save_model_checkpoint(root / "ckpt", jax.device_get(params), cfg,
                               tokenizer_dir=root / "tokenizer")


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
  return f"data:{mime};base64," + base64.b64encode(data).decode()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(backend, *, model_name: str = "tiny", engine_options=None, **settings):
  """Serves `backend` with uvicorn on a free loopback port; yields (base_url, engine)."""
  import uvicorn
  engine = BatchingEngine(backend, **(engine_options or {})).start()
  app = create_app(engine, ServeSettings(model_name=model_name, **settings))
  port = free_port()
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 30
  while not server.started:
    if time.monotonic() > deadline or not thread.is_alive():
      raise RuntimeError("the test server did not start")
    time.sleep(0.02)
  try:
    yield f"http://127.0.0.1:{port}", engine
  finally:
    server.should_exit = True
    thread.join(30)
    engine.stop()


class _ScriptedPredictor:
  """What ModelBackend reads from a Predictor, without parameters."""

  def __init__(self, tokenizer_dir: Path, max_crops: int | None = None):
    self.config = tiny_config()
    self.tokenizer = MolmoTokenizer.from_checkpoint(tokenizer_dir, VOCAB)
    self.max_crops = self.config.preprocess.max_crops if max_crops is None else max_crops
    self.length_bucket = 64
    self.mesh = None
    self.model = None
    self.params = None


class ScriptedBackend(ModelBackend):
  """Real request handling and pre-processing; 'generation' replays the tokens of a known answer
  (`answer(prepared)` -> text), one token per step, `step_delay_s` apart."""

  def __init__(self, tokenizer_dir: Path, answer, step_delay_s: float = 0.0):
    super().__init__(_ScriptedPredictor(tokenizer_dir))
    self.answer = answer
    self.step_delay_s = step_delay_s
    self.started_batches: list[int] = []

  def start(self, inputs, rows, steps, sampling, seeds):
    self.started_batches.append(len(inputs))
    scripts = [self.tokenizer.encode(self.answer(p)) + [self.tokenizer.eos_id] for p in inputs]
    return _ScriptedRun(scripts, rows, self.step_delay_s)


class _ScriptedRun:
  def __init__(self, scripts, rows, delay):
    self.scripts, self.rows, self.delay, self.index = scripts, rows, delay, 0

  def step(self, done, remaining, chunk):
    time.sleep(self.delay)
    out = np.full((self.rows, 1), -1, np.int64)
    for row, script in enumerate(self.scripts):
      if not done[row] and remaining[row] > 0:
        out[row, 0] = script[min(self.index, len(script) - 1)]
    self.index += 1
    return out


def demo_tokenizer_dir(root: Path) -> Path:
  path = root / "tokenizer"
  if not path.exists():
    save_demo_tokenizer(path, build_demo_tokenizer(vocab_size=VOCAB))
  return path
