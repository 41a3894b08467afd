"""Ask a Molmo checkpoint about images in three lines.

    predictor = Predictor.from_checkpoint("ckpt/molmo-7b-d")
    answer = predictor.ask("bike.jpg", "Point to the bike")
    print(answer.text, answer.points)

The predictor owns the config, the parameters (optionally sharded over a mesh), the tokenizer and
the pre-processing; batching, bucketing of prompt lengths and point parsing happen here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from molmo_jax import sharding
from molmo_jax.config import MolmoConfig
from molmo_jax.errors import UserError
from molmo_jax.generate import GenerationOutput, SamplingConfig, generate
from molmo_jax.models.molmo import Molmo, abstract_params
from molmo_jax.preprocess import inputs, points as points_lib
from molmo_jax.preprocess.tokens import MolmoTokenizer


@dataclasses.dataclass
class Prediction:
  text: str
  finish_reason: str                 # eos | length | stop
  tokens: list[int]
  image_size: tuple[int, int] | None  # (w, h) of the original image; points are relative to it
  points: np.ndarray                 # [K, 2] pixels, parsed from the answer (empty if none)
  # log p of each generated token (EOS included) with SamplingConfig(logprobs=True), else None
  logprobs: list[float] | None = None

  @property
  def count(self) -> int | None:
    """Number stated by a counting answer ("... a total of N.", "There are none."), else None."""
    from molmo_jax.evals.metrics import parse_count
    return parse_count(self.text)

  def to_json(self) -> dict[str, Any]:
    out = {"answer": self.text, "finish_reason": self.finish_reason,
           "image_size": list(self.image_size) if self.image_size else None,
           "points": self.points.round(2).tolist(), "count": self.count}
    if self.logprobs is not None:
      out["logprobs"] = [round(v, 5) for v in self.logprobs]
    return out


def apply_stop_strings(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  cut = min((text.find(s) for s in stop if s and s in text), default=-1)
  return (text[:cut], True) if cut >= 0 else (text, False)


def _label(image: Any, index: int) -> str:
  return f"prompt {index} (image {image})" if isinstance(image, (str, os.PathLike)) else f"prompt {index}"


def fit_context(prompt_lengths: Sequence[int], max_new_tokens: int, limit: int,
                shorten: bool = False, labels: Sequence[str] | None = None) -> int:
  """max_new_tokens to generate with, checked against the model's position limit.

  Every position (prompt tokens, image tokens included, then each new token) must be below
  `limit`. Refuses with a UserError naming the longest prompt, or with `shorten` returns the
  largest max_new_tokens that fits (a prompt that alone fills the context is still refused).
  """
  if max_new_tokens < 1:
    raise UserError("max_new_tokens", f"expected >= 1, got {max_new_tokens}")
  longest = max(range(len(prompt_lengths)), key=lambda i: prompt_lengths[i])
  length = prompt_lengths[longest]
  label = labels[longest] if labels else f"prompt {longest}"
  if length + max_new_tokens <= limit:
    return max_new_tokens
  if shorten and length < limit:
    return limit - length
  raise UserError(label, f"{length} tokens (text and image) + max_new_tokens {max_new_tokens} = "
                  f"{length + max_new_tokens} exceeds the model's {limit} positions",
                  "shorten the prompt, use fewer crops or fewer new tokens"
                  + ("" if length >= limit else ", or allow shortening the answer to fit"))


class Predictor:
  """Generation front end over a model directory (see molmo_jax.model_dir)."""

  def __init__(self, config: MolmoConfig, params: Any, tokenizer: MolmoTokenizer, *,
               mesh: jax.sharding.Mesh | None = None, max_crops: int | None = None,
               length_bucket: int = 64, quantize: Any = None):
    """quantize: None / "none" (float weights), "int8" or "int4" weight-only for the language
    model, "+vit" to include the vision tower (e.g. "int8+vit"), or a QuantizeConfig; float
    `params` are quantized here, already quantized ones (a saved quantized directory) are used
    as they are (see molmo_jax.quantize)."""
    from molmo_jax import quantize as quantize_lib
    self.config = config
    self.quantize = quantize_lib.from_mapping(quantize)
    self.model = quantize_lib.quantized_model(Molmo(config), self.quantize)
    if quantize_lib.is_quantized_tree(params):
      if not self.quantize.enabled:
        raise UserError("params", "are quantized", "pass the quantize mode they were made with")
    elif self.quantize.enabled:
      if mesh is not None:
        with sharding.activate(mesh):
          params = quantize_lib.quantize_params(self.model, params)
      else:
        params = quantize_lib.quantize_params(self.model, params)
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.max_crops = config.preprocess.max_crops if max_crops is None else max_crops
    self.length_bucket = length_bucket

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, *, dtype: str | None = None,
                      mesh: jax.sharding.Mesh | None = None, max_crops: int | None = None,
                      resize_method: str | None = None,
                      preprocess: Mapping[str, Any] | None = None,
                      step: int | None = None, quantize: Any = None) -> "Predictor":
    """Loads params, config and tokenizer from a model directory or a training workdir (its
    latest checkpoint, or `step`); relative paths are fine.

    Args:
      dtype: "bfloat16"/"float32" overrides compute and parameter dtype.
      mesh: the params are restored directly into their shardings.
      max_crops: high-res crops per image (default: the config's).
      resize_method: "tensorflow" (what converted release checkpoints use, as the HF processor)
        or "torchvision" (the native repo's default); see docs/fidelity.md.
      preprocess: other PreprocessConfig fields to change (e.g. {"alpha": "composite"}).
      step: the training step when `directory` is a training workdir (default: the latest).
      quantize: "int8", "int4", "int8+vit", ... quantizes the weights at load time
        (molmo_jax.quantize); None / "none" keeps them in float. A saved quantized directory
        (python -m molmo_jax.quantize) loads in its own mode; another mode is refused.
    """
    from molmo_jax import quantize as quantize_lib
    from molmo_jax.model_dir import load_model_checkpoint, locate_model
    source = locate_model(directory, step)
    config = source.read_config()
    if dtype is not None:
      config = config.replace(dtype=dtype, param_dtype=dtype)
    config = config.with_preprocess(resize_method=resize_method, **dict(preprocess or {}))
    saved = quantize_lib.saved_quantization(source.path)
    if saved is not None:
      asked = quantize_lib.from_mapping(quantize)
      if asked.enabled and asked != saved:
        raise UserError(f"--quantize {asked.name}", f"{source.path} is saved quantized as {saved.name}",
                        "leave --quantize out for this directory")
      quantize = saved
      qmodel = quantize_lib.quantized_model(Molmo(config), saved)
      expected = quantize_lib.abstract_storable(qmodel, mesh)
    else:
      expected = abstract_params(config, mesh)
    ckpt = load_model_checkpoint(directory, expected_params=expected, step=step,
                                 quantized=saved is not None)
    if ckpt.tokenizer_dir is None:
      raise FileNotFoundError(f"{source.describe()}: no tokenizer/ folder; copy the tokenizer "
                              "files (tokenizer.json, ...) there")
    tokenizer = MolmoTokenizer.from_checkpoint(ckpt.tokenizer_dir, config.llm.vocab_size)
    params = ckpt.params if saved is None else quantize_lib.from_storable(ckpt.params, qmodel)
    return cls(config, params, tokenizer, mesh=mesh, max_crops=max_crops, quantize=quantize)

  def batch(self, images: Sequence[Any], prompts: Sequence[str], *,
            style: str | None = None) -> inputs.ModelBatch:
    """The model batch for images[i] (None, one image or a list) with prompts[i]; see
    `molmo_jax.preprocess.inputs.build_batch`."""
    return inputs.build_batch(images, prompts, self.tokenizer, self.config, style=style,
                              max_crops=self.max_crops, length_bucket=self.length_bucket)

  def predict(self, images: Sequence[Any], prompts: Sequence[str], *,
              sampling: SamplingConfig | None = None, style: str | None = None,
              stop_strings: Sequence[str] = (), seed: int = 0,
              shorten_to_fit: bool = False) -> list[Prediction]:
    """One batch: images[i] (path, bytes, PIL, array, a list of those, or None) with prompts[i].

    A prompt (text + image tokens) plus max_new_tokens beyond the model's position limit
    (llm.rope_max_length) is refused with a UserError before anything is compiled, unless
    `shorten_to_fit` lowers max_new_tokens for this batch to what fits.
    """
    if len(images) != len(prompts):
      raise ValueError(f"predict: {len(images)} images but {len(prompts)} prompts")
    sampling = sampling or SamplingConfig()
    sampling = dataclasses.replace(sampling, eos_id=self.tokenizer.eos_id)
    batch = self.batch(images, prompts, style=style)
    max_new = fit_context(batch.lengths, sampling.max_new_tokens, self.config.llm.rope_max_length,
                          shorten_to_fit, labels=[_label(img, i) for i, img in enumerate(images)])
    sampling = dataclasses.replace(sampling, max_new_tokens=max_new)
    out = self._generate(batch.arrays, sampling, seed)
    preds = []
    for i, size in enumerate(batch.image_sizes):
      tokens = [int(t) for t in out.tokens[i, :out.lengths[i]]]
      text_tokens = [t for t in tokens if t != self.tokenizer.eos_id]
      text, stopped = apply_stop_strings(self.tokenizer.decode(text_tokens), stop_strings)
      reason = "stop" if stopped else out.finish_reasons[i]
      pts = points_lib.parse_points(text, size) if size else np.zeros((0, 2), np.float32)
      logprobs = None if out.logprobs is None else out.logprobs[i, :len(tokens)].tolist()
      preds.append(Prediction(text.strip(), reason, tokens, size, pts, logprobs))
    return preds

  def _generate(self, batch: dict, sampling: SamplingConfig, seed: int) -> GenerationOutput:
    rng = jax.random.PRNGKey(seed)
    if self.mesh is None:
      return generate(self.model, self.params, batch, sampling, rng)
    with sharding.activate(self.mesh):
      batch = {k: jax.device_put(np.asarray(v), sharding.data_sharding(self.mesh, np.ndim(v)))
               for k, v in batch.items()}
      return generate(self.model, self.params, batch, sampling, rng)

  def ask(self, image: Any, prompt: str, **kwargs) -> Prediction:
    return self.predict([image], [prompt], **kwargs)[0]

  def predict_many(self, images: Sequence[Any], prompts: Sequence[str], batch_size: int = 8,
                   progress: bool = False, **kwargs) -> Iterable[Prediction]:
    """Splits a long list into batches; yields predictions in order."""
    starts = range(0, len(prompts), batch_size)
    if progress:
      from molmo_jax.progress import progress as progress_bar
      bar = progress_bar(len(starts), "predict", unit="batch")
    for s in starts:
      yield from self.predict(images[s:s + batch_size], prompts[s:s + batch_size], **kwargs)
      if progress:
        bar.update(1)
    if progress:
      bar.close()
