"""Pictures while training: every `preview.every` steps the run answers a fixed handful of
held-out examples with the current parameters and logs, next to the scalars in TensorBoard, each
image with the predicted (filled) and true (crosses) points drawn, and the question, answer and
reference as text (`preview/<i>` images and texts).

Examples come from `config.preview.source` (a source like those of `config.data.sources`;
default: the first training source), its first `preview.num_examples` records that have an image.
Process 0 of a single-process run only (generation on a multi-host mesh is not done here).
In a LoRA run (float base) the preview answers with the adapters folded into the base, the model
that the run will write to model/.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import numpy as np

from molmo_jax import lora as lora_lib

_log = logging.getLogger("molmo_jax.train")


def _record_points(record: dict, size: tuple[int, int]) -> np.ndarray | None:
  """The record's true points in pixels (JSONL `points` with `point_units`, or synthetic)."""
  points = record.get("points")
  if points is None:
    return None
  points = np.asarray(points, np.float32).reshape(-1, 2)
  if record.get("point_units") == "percent":
    points = points * np.asarray(size, np.float32) / 100.0
  return points


class TrainingPreview:
  """Decodes `num_examples` fixed examples with the current parameters and logs them."""

  def __init__(self, exp: Any, tokenizer: Any, writer: Any, every: int, num_examples: int = 4,
               max_new_tokens: int = 64, source: Any = None):
    self.every = int(every)
    self.writer = writer
    self.max_new_tokens = int(max_new_tokens)
    self.examples: list[dict] = []
    self._predictor = None
    lora_cfg = getattr(exp, "lora", None)
    self._lora = lora_cfg if lora_cfg is not None and lora_cfg.enabled else None
    if self.every <= 0 or writer is None or tokenizer is None or jax.process_count() > 1:
      self.every = 0
      return
    from molmo_jax.data.sources import SourceConfig, open_source
    from molmo_jax.predictor import Predictor
    from molmo_jax.preprocess import image_io
    sources = exp.data_config.sources
    if source:
      cfg = SourceConfig.from_dict({"name": "preview", **dict(source)})
    elif sources:
      cfg = sources[0]
    else:
      self.every = 0
      return
    records = open_source(cfg)
    for index in range(len(records)):
      record = records[index]
      if record.get("image") is None:
        continue
      image = image_io.load_image(record["image"])
      turns = record["conversations"][0]
      size = (image.shape[1], image.shape[0])
      self.examples.append({"image": image, "question": turns[0], "answer": turns[1],
                            "style": record.get("style"), "points": _record_points(record, size)})
      if len(self.examples) >= num_examples:
        break
    # No mesh: the few examples need not fill the data-parallel axes; the sharded parameters
    # are read where they are.
    self._predictor = Predictor(exp.model_config, None, tokenizer)

  def due(self, step: int) -> bool:
    return self.every > 0 and bool(self.examples) and step % self.every == 0

  def log(self, step: int, params: Any) -> None:
    from molmo_jax.generate import SamplingConfig
    from molmo_jax.preprocess import points as points_lib
    start = time.perf_counter()
    if self._lora is not None:
      # The plain model the Predictor runs would ignore lora_a / lora_b leaves.
      params = lora_lib.merged_run_params(params, self._lora)
    self._predictor.params = params
    preds = self._predictor.predict(
        [e["image"] for e in self.examples], [e["question"] for e in self.examples],
        sampling=SamplingConfig(max_new_tokens=self.max_new_tokens))
    for i, (example, pred) in enumerate(zip(self.examples, preds)):
      drawn = points_lib.draw_points(example["image"], pred.points, example["points"])
      self.writer.add_image(f"preview/{i}", np.asarray(drawn), step, dataformats="HWC")
      self.writer.add_text(f"preview/{i}", f"**Q:** {example['question']}  \n**model:** "
                           f"{pred.text}  \n**reference:** {example['answer']}", step)
    self.writer.flush()
    _log.info("preview of %d examples at step %d -> TensorBoard (%.1f s)", len(preds), step,
              time.perf_counter() - start)
