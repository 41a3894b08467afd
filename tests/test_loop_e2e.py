"""The whole loop through the real command lines, with relative paths (subprocesses, cwd = tmp):

  a model directory (what the converter writes; here tiny random weights + the demo tokenizer)
  -> JSONL with images and points -> train.py (finetune_custom recipe, 3 steps) -> WORKDIR/model/
  -> predict --checkpoint WORKDIR -> eval.py --checkpoint WORKDIR (a local task)
  -> convert.orbax_to_hf WORKDIR -> convert.hf_to_orbax -> the same logits as the trained params.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from molmo_jax import config as C
from molmo_jax.data.demo_tokenizer import build_demo_tokenizer, save_demo_tokenizer
from molmo_jax.model_dir import load_model_checkpoint, locate_model, save_model_checkpoint
from molmo_jax.models.molmo import Molmo, example_batch_shapes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


def run(cwd: Path, *args: str, expect: int = 0) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == expect, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc.stdout + proc.stderr


def write_data(root: Path, count: int = 16) -> None:
  """Images with one red square each and a JSONL asking to point at it (pixel points)."""
  rng = np.random.default_rng(0)
  (root / "data" / "images").mkdir(parents=True)
  lines = []
  for i in range(count):
    h, w = int(rng.integers(40, 80)), int(rng.integers(40, 80))
    image = np.full((h, w, 3), 230, np.uint8)
    x, y = int(rng.integers(4, w - 14)), int(rng.integers(4, h - 14))
    image[y:y + 10, x:x + 10] = (220, 20, 20)
    Image.fromarray(image).save(root / "data" / "images" / f"{i}.png")
    lines.append(json.dumps({"image": f"images/{i}.png", "question": "Point to the red square.",
                             "task": "pointing", "label": "red square",
                             "points": [[x + 5.0, y + 5.0]]}))
  (root / "data" / "train.jsonl").write_text("\n".join(lines) + "\n")


def base_model(root: Path):
  cfg = C.tiny("qwen2", vocab_size=448, embedding_size=448)
  save_demo_tokenizer(root / "tok", build_demo_tokenizer(vocab_size=448))
  batch = {k: jnp.zeros(v.shape, v.dtype) for k, v in example_batch_shapes(cfg).items()}
  params = nn.unbox(Molmo(cfg).init(jax.random.PRNGKey(0), batch))["params"]
  save_model_checkpoint(root / "base", jax.device_get(params), cfg, tokenizer_dir=root / "tok")
  return cfg


def logits(cfg, params) -> np.ndarray:
  batch = {k: jnp.asarray(np.random.default_rng(1).integers(0, 400, v.shape) if v.dtype == jnp.int32
                          else np.random.default_rng(2).normal(size=v.shape), v.dtype)
           for k, v in example_batch_shapes(cfg).items()}
  batch["image_input_idx"] = jnp.zeros_like(batch["image_input_idx"]) - 1
  out, _ = Molmo(cfg).apply({"params": params}, batch)
  return np.asarray(out)


def event_tags(directory: Path) -> dict[str, set[str]]:
  """Summary tags by kind in TensorBoard event files (TFRecord framing, tensorboardX protos)."""
  import struct
  from tensorboardX.proto import event_pb2
  tags = {"image": set(), "text": set(), "scalar": set()}
  for path in directory.glob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        kind = ("image" if value.HasField("image") else
                "text" if value.metadata.plugin_data.plugin_name == "text" else "scalar")
        tags[kind].add(value.tag)
  return tags


@pytest.mark.slow
def test_data_train_predict_eval_export_with_relative_paths(tmp_path):
  cfg = base_model(tmp_path)
  write_data(tmp_path)
  recipe = os.path.relpath(REPO / "configs" / "finetune_custom.py", tmp_path)
  out = run(tmp_path, str(REPO / "train.py"), "--config", f"{recipe}:model=base,data=data/train.jsonl",
            "--workdir", "run", "--config.total_steps=3", "--config.data.global_batch_size=8",
            "--config.data.seq_len=448", "--config.data.num_workers=0", "--config.mesh.data=-1",
            "--config.mesh.fsdp=1", "--config.model.dtype=float32", "--config.model.remat_policy=none",
            "--config.checkpoint.save_every=2", "--config.preview.every=3",
            "--config.preview.num_examples=2", "--config.preview.max_new_tokens=4")
  # Defaults that scale down: the recipe's 50-step warmup is clamped, padding is reported.
  assert "warmup_steps=50 is >= total_steps=3" in out and "% padding" in out
  assert "compiling the train step" in out and "saved checkpoint 3" in out and "step 3/3" in out
  run_dir = tmp_path / "run"
  assert (run_dir / "model" / "config.json").is_file() and (run_dir / "model" / "tokenizer").is_dir()
  tags = event_tags(run_dir / "tensorboard")
  assert {"preview/0", "preview/1"} <= tags["image"] and "preview/0/text_summary" in tags["text"]
  assert "loss" in tags["scalar"] and not any(t.startswith("moe_") for t in tags["scalar"])
  source = locate_model(run_dir)
  assert source.step == 3 and locate_model(run_dir, step=2).step == 2
  trained = load_model_checkpoint(run_dir)
  exported = load_model_checkpoint(run_dir / "model")
  jax.tree.map(np.testing.assert_array_equal, exported.params, trained.params)

  out = run(tmp_path, "-m", "molmo_jax.predict", "--checkpoint", "run", "--image", "data/images/0.png",
            "--prompt", "Point to the red square.", "--max-new-tokens", "6", "--json")
  answer = json.loads(out.strip().splitlines()[-1])
  assert answer["image"] == "data/images/0.png" and "answer" in answer
  run(tmp_path, "-m", "molmo_jax.predict", "--checkpoint", "run", "--step", "2", "--prompt", "Hi",
      "--max-new-tokens", "2")

  run(tmp_path, str(REPO / "eval.py"), "--checkpoint", "run", "--task", "synthetic_count",
      "--limit", "2", "--batch-size", "2", "--max-new-tokens", "4", "--output", "evals",
      "--no-progress")
  metrics = json.loads((tmp_path / "evals" / "synthetic_count.metrics.json").read_text())
  assert metrics["evaluated"] == 2

  run(tmp_path, "-m", "convert.orbax_to_hf", "run", "hf")
  run(tmp_path, "-m", "convert.hf_to_orbax", "hf", "back")
  back = load_model_checkpoint(tmp_path / "back")
  assert back.config.llm == trained.config.llm
  np.testing.assert_array_equal(logits(back.config, back.params), logits(trained.config, trained.params))
  # Training changed the weights (the loop ran), and the round trip kept them.
  base = load_model_checkpoint(tmp_path / "base")
  assert not np.array_equal(logits(cfg, base.params), logits(trained.config, trained.params))
