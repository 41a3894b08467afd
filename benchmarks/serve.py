"""Serving under load on the loopback: N concurrent clients against `python -m molmo_jax.serve`,
versus the same requests run one by one through `Predictor`.

    python benchmarks/serve.py [--checkpoint DIR] [--clients 1,8,32] [--requests 64] [--duration 120]

Without --checkpoint a tiny random model (the tests' tiny Qwen2-family Molmo with the demo
tokenizer) is written to a temporary folder. Every level sends a fixed list of image questions
(greedy, `--max-tokens` new tokens at most) from N client tasks until `--requests` are answered or
`--duration` seconds have passed, then stops. Only 127.0.0.1 is contacted; the server runs as a
subprocess and is terminated at the end. Prints a table (requests/s, tokens/s, p50/p99 latency,
errors, throughput relative to serial) and writes benchmarks/results/serve.json.

Wall-clock numbers depend on what else runs on the machine (the load average before and after
each run is recorded). The CPU columns do not: "CPU ms/req" is the CPU time the serving process
used per answered request (the benchmark process itself for the serial run, the server process
read from /proc for the levels; the client's own CPU is reported apart), and "x serial (CPU)" is
serial CPU per request over the server's, i.e. the throughput ratio on an otherwise idle machine
with the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Point to the cat", "Count the red circles", "Describe this image.", "What colour is it?",
           "Point to the square", "How many shapes are there?", "Is there a dog?", "Point to the sky"]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default=None, help="model directory (default: a tiny random model)")
  p.add_argument("--clients", default="1,8,32", help="concurrency levels")
  p.add_argument("--requests", type=int, default=256, help="requests per level (and serially)")
  p.add_argument("--duration", type=float, default=120.0, help="seconds at most per level")
  p.add_argument("--max-tokens", type=int, default=32)
  p.add_argument("--text-only", action="store_true",
                 help="questions without images (no vision tower: decoding dominates)")
  p.add_argument("--port", type=int, default=8391)
  p.add_argument("--out", default=str(ROOT / "benchmarks/results/serve.json"))
  return p.parse_args(argv)


def tiny_checkpoint(root: Path) -> Path:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from molmo_jax import config as C
  from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
  from molmo_jax.models.molmo import Molmo, example_batch_shapes
  from molmo_jax.model_dir import save_model_checkpoint
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(root / "tokenizer", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  return save_model_checkpoint(root / "ckpt", jax.device_get(params), cfg, tokenizer_dir=root / "tokenizer")


def make_requests(n: int, text_only: bool = False) -> list[tuple[np.ndarray, str, str]]:
  """(image, prompt, data URL) triples: a few image sizes, eight prompts (image and URL None
  with text_only)."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    if text_only:
      out.append((None, PROMPTS[i % len(PROMPTS)], None))
      continue
    w, h = [(70, 50), (64, 64), (90, 60)][i % 3]
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    out.append((image, PROMPTS[i % len(PROMPTS)], url))
  return out


def process_cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process (all its threads) from /proc."""
  fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarise(latencies: list[float], tokens: int, errors: int, wall: float, cpu: float) -> dict:
  lat = np.asarray(latencies) if latencies else np.zeros(1)
  return {"requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
          "cpu_s": round(cpu, 3), "cpu_ms_per_request": round(1000 * cpu / max(1, len(latencies)), 2),
          "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
          "p50_latency_s": round(float(np.percentile(lat, 50)), 4),
          "p99_latency_s": round(float(np.percentile(lat, 99)), 4), "completion_tokens": tokens}


def run_serial(checkpoint: Path, requests, max_tokens: int, duration: float) -> dict:
  from molmo_jax.generate import SamplingConfig
  from molmo_jax.predictor import Predictor
  predictor = Predictor.from_checkpoint(checkpoint)
  sampling = SamplingConfig(max_new_tokens=max_tokens)
  for image, prompt, _ in requests[:3]:   # compile every image-size bucket first
    predictor.predict([image], [prompt], sampling=sampling)
  latencies, tokens = [], 0
  start, cpu_start = time.perf_counter(), time.process_time()
  for image, prompt, _ in requests:
    t = time.perf_counter()
    pred = predictor.predict([image], [prompt], sampling=sampling)[0]
    latencies.append(time.perf_counter() - t)
    tokens += len(pred.tokens)
    if time.perf_counter() - start > duration:
      break
  return summarise(latencies, tokens, 0, time.perf_counter() - start,
                   time.process_time() - cpu_start)


async def _post_json(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str,
                     path: str, body: bytes) -> tuple[int, bytes]:
  """One HTTP/1.1 POST on a kept-alive connection: (status, response body)."""
  writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
  status = int((await reader.readline()).split()[1])
  length = None
  while (line := await reader.readline()) not in (b"\r\n", b""):
    name, _, value = line.partition(b":")
    if name.strip().lower() == b"content-length":
      length = int(value)
  if length is None:
    raise ConnectionError(f"response {status} without Content-Length")
  return status, await reader.readexactly(length)


async def run_clients(base: str, requests, clients: int, max_tokens: int, total: int,
                      duration: float, server_pid: int) -> dict:
  """`clients` connections, each sending its next request when the last one is answered.

  The clients speak HTTP/1.1 over asyncio streams directly: httpx's AsyncClient cost 2.0-3.5 ms
  of CPU per request here, which on a small machine is taken from the server being measured;
  these cost 0.2-0.5 ms (reported as client_cpu_ms_per_request)."""
  host, port = base.removeprefix("http://").split(":")
  bodies = []
  for _, prompt, url in requests:
    content = [{"type": "text", "text": prompt}]
    if url is not None:
      content.append({"type": "image_url", "image_url": {"url": url}})
    bodies.append(json.dumps({"messages": [{"role": "user", "content": content}],
                              "max_tokens": max_tokens, "temperature": 0}).encode())
  latencies, errors, tokens = [], 0, 0
  queue = list(range(total))
  start, server_cpu, client_cpu = time.perf_counter(), process_cpu_seconds(server_pid), time.process_time()

  async def client():
    nonlocal errors, tokens
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
      while queue and time.perf_counter() - start < duration:
        i = queue.pop(0)
        t = time.perf_counter()
        try:
          status, data = await _post_json(reader, writer, host, "/v1/chat/completions",
                                          bodies[i % len(bodies)])
        except (OSError, ConnectionError, asyncio.IncompleteReadError, ValueError, IndexError):
          errors += 1
          writer.close()
          reader, writer = await asyncio.open_connection(host, int(port))
          continue
        if status != 200:
          errors += 1
          continue
        tokens += json.loads(data)["usage"]["completion_tokens"]
        latencies.append(time.perf_counter() - t)
    finally:
      writer.close()

  await asyncio.gather(*(client() for _ in range(clients)))
  row = summarise(latencies, tokens, errors, time.perf_counter() - start,
                  process_cpu_seconds(server_pid) - server_cpu)
  row["client_cpu_ms_per_request"] = round(1000 * (time.process_time() - client_cpu)
                                           / max(1, len(latencies)), 3)
  return row


def compiled_shapes(base: str) -> int:
  """How many batch shapes the server has compiled so far (its /health counter)."""
  import httpx
  return int(httpx.get(base + "/health", timeout=30).json().get("compiled_shapes", 0))


def wait_for_server(base: str, process: subprocess.Popen, timeout: float = 600) -> None:
  import httpx
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f"the server exited with code {process.returncode}")
    try:
      if httpx.get(base + "/health", timeout=2).status_code == 200:
        return
    except httpx.HTTPError:
      pass
    time.sleep(0.5)
  raise RuntimeError("the server did not come up")


def main(argv=None) -> int:
  args = parse_args(argv)
  levels = [int(c) for c in args.clients.split(",")]
  requests = make_requests(args.requests, args.text_only)
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = Path(args.checkpoint) if args.checkpoint else tiny_checkpoint(Path(tmp))
    load_before = os.getloadavg()[0]
    serial = run_serial(checkpoint, requests, args.max_tokens, args.duration)
    serial["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"serial Predictor: {serial['requests_per_s']:.2f} requests/s", flush=True)

    base = f"http://127.0.0.1:{args.port}"
    # Batch sizes: the server's default powers of two up to the largest level, all compiled by
    # its warm-up before it listens (no compilation while a level is measured: see "compiles").
    command = [sys.executable, "-m", "molmo_jax.serve", "--checkpoint", str(checkpoint), "--host",
               "127.0.0.1", "--port", str(args.port), "--max-batch", str(max(levels)),
               "--queue-size", str(4 * max(levels)), "--warmup-max-tokens", str(args.max_tokens),
               "--warmup-kinds", "text" if args.text_only else "image",
               "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    server = subprocess.Popen(command, env=env)
    results = {}
    try:
      wait_for_server(base, server)
      for clients in levels:   # warm-up: connections, threads, and any shape warm-up missed
        asyncio.run(run_clients(base, requests, clients, args.max_tokens, clients, 600, server.pid))
      for clients in levels:
        load_before, compiled = os.getloadavg()[0], compiled_shapes(base)
        row = asyncio.run(run_clients(base, requests, clients, args.max_tokens, args.requests,
                                      args.duration, server.pid))
        row["load_average"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        row["compiles"] = compiled_shapes(base) - compiled
        row["vs_serial"] = round(row["requests_per_s"] / serial["requests_per_s"], 2)
        row["vs_serial_cpu"] = round(serial["cpu_ms_per_request"] / row["cpu_ms_per_request"], 2)
        results[clients] = row
        print(f"{clients} clients: {row['requests_per_s']:.2f} requests/s", flush=True)
    finally:
      server.terminate()
      try:
        server.wait(30)
      except subprocess.TimeoutExpired:
        server.kill()

  header = (f"{'run':<22}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'errors':>8}{'x serial':>10}"
            f"{'CPU ms/req':>12}{'x serial (CPU)':>16}{'load':>12}")
  print(header)
  print("-" * len(header))

  def line(name, row, ratio, cpu_ratio):
    load = "/".join(f"{v:.1f}" for v in row["load_average"])
    print(f"{name:<22}{row['requests_per_s']:>8.2f}{row['tokens_per_s']:>9.1f}{row['p50_latency_s']:>8.3f}"
          f"{row['p99_latency_s']:>8.3f}{row['errors']:>8d}{ratio:>10.2f}{row['cpu_ms_per_request']:>12.1f}"
          f"{cpu_ratio:>16.2f}{load:>12}")

  line("Predictor, serial", serial, 1.0, 1.0)
  for clients, row in results.items():
    line(f"server, {clients} clients", row, row["vs_serial"], row["vs_serial_cpu"])
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({
      "model": "tiny random qwen2-family Molmo" if not args.checkpoint else str(args.checkpoint),
      "max_tokens": args.max_tokens, "requests_per_level": args.requests,
      "questions": "text only" if args.text_only else "image questions",
      "cpu_count": os.cpu_count(), "serial": serial,
      "server": {str(k): v for k, v in results.items()},
      "note": ("load_average = 1-minute load before/after the run; other processes share the "
               "CPU. cpu_ms_per_request: CPU time of the serving process (serial: this process) "
               "per answered request; vs_serial_cpu = serial's over the server's")},
      indent=2) + "\n")
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
