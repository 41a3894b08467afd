"""Data types passed between the image and the token pre-processing steps."""

from __future__ import annotations

import dataclasses

import numpy as np

# Marks a pooled cell that is not inserted into the text (discarded overlap margin).
IGNORED_INDEX = -100


@dataclasses.dataclass(frozen=True)
class MultiCropImage:
  """One image cut into a low-res global view plus overlapping high-res crops.

  Legend: N = crops incl. the global view (rows*cols + 1), P = patches per crop,
  Q = pooled cells per crop, C = patch_size*patch_size*3.

  Attributes:
    images: [N, P, C] float32, normalised pixels, patches in (dy, dx, c) order; global view first.
    image_masks: [N, P] float32, fraction of real (non-letterbox) pixels per patch, paired with
      the crops as the released models were trained (the reference's olmo/data/model_preprocessor.py (image_masks) off-by-one) unless fixed.
    feature_rank: [N, Q] int32. For each pooled cell, its index in this image's sequence of
      <im_patch> tokens: 0..Q-1 are the global view's cells in raster order, Q + k is the k-th
      cell of the high-res pooled grid in raster order. IGNORED_INDEX for discarded cells.
    crop_grid: (rows, cols) of the high-res tiling.
    pooled_grid: (grid_rows, grid_cols) of the high-res pooled grid (all kept cells).
    lowres_grid: (rows, cols) of the global view's pooled grid (12x12 for 336 px crops).
    original_size: (width, height) of the image after EXIF orientation: points are relative to it.
  """

  images: np.ndarray
  image_masks: np.ndarray
  feature_rank: np.ndarray
  crop_grid: tuple[int, int]
  pooled_grid: tuple[int, int]
  lowres_grid: tuple[int, int]
  original_size: tuple[int, int]

  @property
  def num_crops(self) -> int:
    return int(self.images.shape[0])

  @property
  def num_features(self) -> int:
    """Number of <im_patch> tokens this image needs (= kept pooled cells)."""
    return self.lowres_grid[0] * self.lowres_grid[1] + self.pooled_grid[0] * self.pooled_grid[1]
