"""Raw inputs -> the exact batch `Molmo.apply` takes: the one public entry point for inference.

    from molmo_jax.preprocess import inputs
    batch = inputs.build_batch(["bike.jpg"], ["Point to the bike"], tokenizer, config)
    logits, _ = Molmo(config).apply({"params": params}, batch.arrays)
    # or: generate(model, params, batch.arrays, sampling)

Legend: B = examples, S = padded sequence length, M = max_crops + 1 crop slots, P = patches per
crop, C = patch_size*patch_size*3, Q = pooled cells per crop.

Every image of an example goes through `load_pixels` (decode, EXIF orientation, alpha per
PreprocessConfig.alpha), `multicrop_image` (resize, crops, patches) and `build_example` (chat
text, image token blocks, BOS), exactly as training examples are built, then `collate` pads the
batch. `Predictor`, eval and the HTTP server all call this module; there is no second copy.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Union

import numpy as np

from molmo_jax.config import MolmoConfig, PreprocessConfig
from molmo_jax.preprocess import examples, image as image_lib, image_io
from molmo_jax.preprocess.tokens import MolmoTokenizer
from molmo_jax.preprocess.types import MultiCropImage

# One example's images: None (text only), one image, or a list of images (in the order of the
# prompt's <|image|> markers, or all placed before the text when it has none). An image is a
# path, encoded bytes, a PIL image, a uint8 array [H, W(, 1|3|4)] or an already cut
# MultiCropImage.
ImageLike = Union[image_io.ImageSource, MultiCropImage]
ImagesInput = Union[None, ImageLike, Sequence[ImageLike]]

DEFAULT_LENGTH_BUCKET = 64


@dataclasses.dataclass(frozen=True)
class ModelBatch:
  """A padded batch and what is needed to read the answers.

  Attributes:
    arrays: the batch `Molmo.apply` / `generate` take: input_ids, subsegment_ids, position_ids
      [B, S] int32 (padding -1), images [B, M, P, C] float32, image_masks [B, M, P] float32,
      image_input_idx [B, M, Q] int32 (absent crop slots all -1).
    image_sizes: per example, (width, height) of its first image after EXIF orientation (what
      point coordinates in answers are relative to), or None for text-only examples.
    lengths: per example, its number of tokens before padding.
  """

  arrays: dict[str, np.ndarray]
  image_sizes: list[tuple[int, int] | None]
  lengths: list[int]


def load_pixels(src: image_io.ImageSource, pre: PreprocessConfig | MolmoConfig,
                name: str | None = None) -> np.ndarray:
  """uint8 [H, W, 3] pixels of one image, alpha handled as `pre.alpha` / `pre.alpha_background`
  say (default: dropped as PIL convert("RGB") does, like the reference)."""
  pre = _preprocess_config(pre)
  return image_io.load_image(src, name=name, alpha=pre.alpha,
                             background=tuple(pre.alpha_background))


def prepare_images(images: ImagesInput, pre: PreprocessConfig | MolmoConfig,
                   max_crops: int | None = None) -> list[MultiCropImage]:
  """Loads and cuts one example's images (see ImagesInput); [] for None."""
  pre = _preprocess_config(pre)
  crops = pre.max_crops if max_crops is None else max_crops
  out = []
  for index, image in enumerate(_as_image_list(images)):
    if isinstance(image, MultiCropImage):
      out.append(image)
      continue
    pixels = load_pixels(image, pre, name=None if not isinstance(image, np.ndarray)
                         else f"image {index} <array shape={image.shape} dtype={image.dtype}>")
    out.append(image_lib.multicrop_image(pixels, pre, max_crops=crops))
  return out


def build_inference_example(images: ImagesInput, prompt: str, tokenizer: MolmoTokenizer,
                            config: PreprocessConfig | MolmoConfig, *, style: str | None = None,
                            max_crops: int | None = None
                            ) -> tuple[dict[str, np.ndarray], tuple[int, int] | None]:
  """One unpadded inference example for `prompt` about `images`, and its first image's size.

  The arrays are those of `examples.build_example(..., for_training=False)`: input_ids [T],
  subsegment_ids [T], position_ids [T], images [N, P, C], image_masks [N, P],
  image_input_idx [N, Q] (+ image_tokens_end, kept for `collate`).
  """
  if not isinstance(prompt, str):
    raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
  cut = prepare_images(images, config, max_crops)
  example = examples.build_example([prompt], cut, tokenizer, config, for_training=False,
                                   style=style)
  return example, (cut[0].original_size if cut else None)


def build_batch(images: Sequence[ImagesInput], prompts: Sequence[str], tokenizer: MolmoTokenizer,
                config: PreprocessConfig | MolmoConfig, *, style: str | None = None,
                max_crops: int | None = None, seq_len: int | None = None,
                length_bucket: int = DEFAULT_LENGTH_BUCKET) -> ModelBatch:
  """The batch for prompts[i] about images[i] (see ImagesInput), ready for `Molmo.apply`.

  Args:
    images: per example None, one image, or a list of images.
    prompts: per example the user's question (the chat wrapping " User: ... Assistant:" and the
      optional style prefix are added here).
    tokenizer, config: the model's tokenizer and config (or its PreprocessConfig).
    style: optional style prefix ("vqa2", "pointing", ...) for every prompt.
    max_crops: high-res crops per image (default: config's max_crops); the batch has
      M = max_crops + 1 crop slots, or more when an example's images need more (several images).
    seq_len: padded length; default: the longest example rounded up to a multiple of
      `length_bucket` (fewer distinct shapes means fewer compilations).

  Raises:
    ValueError: the lists' lengths differ, or an example is longer than seq_len.
  """
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of str (one per example), got a str")
  if len(images) != len(prompts):
    raise ValueError(f"build_batch: {len(images)} images but {len(prompts)} prompts")
  if not prompts:
    raise ValueError("build_batch: no prompts")
  pre = _preprocess_config(config)
  crops = pre.max_crops if max_crops is None else max_crops
  built = [build_inference_example(img, p, tokenizer, config, style=style, max_crops=crops)
           for img, p in zip(images, prompts)]
  lengths = [len(ex["input_ids"]) for ex, _ in built]
  if seq_len is None:
    seq_len = bucket_length(max(lengths), length_bucket)
  most_crops = max(ex["images"].shape[0] for ex, _ in built)
  arrays = examples.collate([ex for ex, _ in built], seq_len, max(crops, most_crops - 1))
  return ModelBatch(arrays, [size for _, size in built], lengths)


def bucket_length(length: int, multiple: int = DEFAULT_LENGTH_BUCKET) -> int:
  """`length` rounded up to a multiple of `multiple` (at least one): prompt lengths padded this
  way make a run compile a handful of shapes only."""
  if multiple <= 0:
    raise ValueError(f"length_bucket must be positive, got {multiple}")
  return max(multiple, -(-length // multiple) * multiple)


def _as_image_list(images: ImagesInput) -> list[ImageLike]:
  if images is None:
    return []
  if isinstance(images, (list, tuple)):
    return list(images)
  return [images]


def _preprocess_config(config: PreprocessConfig | MolmoConfig) -> PreprocessConfig:
  return config.preprocess if isinstance(config, MolmoConfig) else config
