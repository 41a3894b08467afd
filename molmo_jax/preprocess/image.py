"""Molmo's multi-crop image pre-processing (the reference's olmo/data/model_preprocessor.py; olmo/data/model_preprocessor.py (image_input_idx)), vectorised NumPy.

Legend:
  H, W    image size in pixels (after EXIF orientation)
  S       crop side in pixels (crop_size); p = patch side; G = S / p patches per crop side
  rows, cols  high-res crop grid; crops start every window_px = p * (G - L - R) pixels
  Hc, Wc  high-res canvas = (rows * window_px + margin_px, cols * window_px + margin_px)
  N       crops incl. the global view = rows * cols + 1
  P = G * G patches per crop; C = p * p * 3 values per patch, ordered (dy, dx, c)
  Q       pooled cells per crop = (G / pool)^2

Pipeline: uint8 [H, W, 3] -> float32 in [0, 1] -> (a) global view: letterboxed into S x S,
(b) canvas: letterboxed into Hc x Wc -> normalised -> overlapping S x S crops -> patches.
The resize is bilinear with antialiasing (a triangle kernel widened by the down-scale factor),
applied as two sparse [out, in] matrices, one per axis, so no image size ever needs compiling.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Literal

import numpy as np
import scipy.sparse
from numpy.lib.stride_tricks import as_strided

from molmo_jax.config import PreprocessConfig
from molmo_jax.preprocess.types import IGNORED_INDEX, MultiCropImage

try:  # writes a sparse product into a caller's buffer; `matrix @ x` would allocate one
  from scipy.sparse._sparsetools import csr_matvecs as _csr_matvecs
except ImportError:  # pragma: no cover - private SciPy API; the public product is the fallback
  _csr_matvecs = None

ResizeMethod = Literal["tensorflow", "torchvision"]
RESIZE_METHODS = ("tensorflow", "torchvision")
_F32 = np.float32


# ----------------------------------------------------------------------------------------------
# Resize and letterbox (the reference's olmo/data/model_preprocessor.py: resize_and_pad)
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Letterbox:
  """Where the resized image sits in the target: rows top..top+height, cols left..left+width."""

  height: int
  width: int
  top: int
  left: int


def letterbox_geometry(height: int, width: int, target: tuple[int, int]) -> Letterbox:
  """Aspect-preserving scaled size and centred offsets, in float32 with truncation (pitfall 4).

  The reference fails when a side truncates to 0 pixels (extreme aspect ratios); we keep 1.
  """
  target_h, target_w = target
  scale = min(_F32(target_h) / _F32(height), _F32(target_w) / _F32(width))
  scaled_h = min(max(int(_F32(height) * scale), 1), target_h)
  scaled_w = min(max(int(_F32(width) * scale), 1), target_w)
  return Letterbox(scaled_h, scaled_w, (target_h - scaled_h) // 2, (target_w - scaled_w) // 2)


def to_unit_float(image: np.ndarray, method: ResizeMethod = "tensorflow",
                  out: np.ndarray | None = None) -> np.ndarray:
  """uint8 -> float32 in [0, 1], rounded as the method's library does (x * (1/255) vs x / 255)."""
  _check_method(method)
  if method == "tensorflow":
    return np.multiply(image, _F32(1 / 255), out=out, dtype=_F32)
  return np.divide(image, _F32(255), out=out, dtype=_F32)


def resize_image(image: np.ndarray, size: tuple[int, int],
                 method: ResizeMethod = "tensorflow") -> np.ndarray:
  """Antialiased bilinear resize of float32 [H, W, ch] to [h, w, ch]; the result is not clipped.

  "tensorflow" reproduces `tf.image.resize(..., "bilinear", antialias=True)` (its
  scale-and-translate spans), "torchvision" reproduces torch's antialiased bilinear
  `interpolate` (Pillow-style bounds). Both are the same triangle filter up to float32 rounding of
  the weights; the axis order here may differ from the libraries', a further ~1e-7 difference.
  """
  _check_method(method)
  if image.ndim != 3 or image.dtype != _F32:
    raise ValueError(f"image: expected float32 [H, W, channels], got {image.dtype} {image.shape}")
  out_h, out_w = (int(s) for s in size)
  if out_h < 1 or out_w < 1 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"size: cannot resize {image.shape[:2]} to {(out_h, out_w)}")
  return _resize(np.ascontiguousarray(image), (out_h, out_w), method, _Workspace()).copy()


def resize_and_pad(image: np.ndarray, target: tuple[int, int],
                   method: ResizeMethod = "tensorflow",
                   pad_value: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
  """Resizes float32 [H, W, ch] in [0, 1] into target (th, tw) with centred letterbox padding.

  Returns (image [th, tw, ch] float32, clipped to [0, 1] then padded with pad_value, NOT
  normalised; validity mask [th, tw] bool, True on image pixels).
  """
  box = letterbox_geometry(image.shape[0], image.shape[1], target)
  resized = resize_image(image, (box.height, box.width), method)
  padded = np.full((target[0], target[1], image.shape[2]), pad_value, dtype=_F32)
  mask = np.zeros(target, dtype=bool)
  np.clip(resized, 0.0, 1.0, out=padded[box.top:box.top + box.height,
                                         box.left:box.left + box.width])
  mask[box.top:box.top + box.height, box.left:box.left + box.width] = True
  return padded, mask


def normalize_image(image: np.ndarray, mean, std) -> np.ndarray:
  """(image - mean) / std per channel in float32, the reference's order of operations."""
  return (image - np.asarray(mean, _F32)) / np.asarray(std, _F32)


class _Workspace:
  """Named scratch arrays reused across calls (one workspace per thread): page-faulting fresh
  multi-megabyte arrays in on every call costs more than the resize arithmetic itself."""

  _KEEP_BYTES = 32 << 20   # an image up to ~2.8 Mpixel; bigger ones allocate afresh

  def __init__(self):
    self._buffers: dict[str, np.ndarray] = {}

  def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape))
    buffer = self._buffers.get(name)
    if buffer is None or buffer.size < size:
      buffer = np.empty(size, _F32)
      if buffer.nbytes <= self._KEEP_BYTES:
        self._buffers[name] = buffer
    return buffer[:size].reshape(shape)


_THREAD_LOCAL = threading.local()


def _thread_workspace() -> _Workspace:
  if not hasattr(_THREAD_LOCAL, "workspace"):
    _THREAD_LOCAL.workspace = _Workspace()
  return _THREAD_LOCAL.workspace


def _resize(image: np.ndarray, size: tuple[int, int], method: str,
            workspace: _Workspace) -> np.ndarray:
  """resize_image on a C-contiguous image; the result may live in the workspace."""
  out_h, out_w = size
  # Swapping axes costs more than the sparse products; resampling the shrinking axis first (or
  # the width first when enlarging) keeps the swapped intermediates smallest.
  order = ((0, out_h), (1, out_w)) if out_h <= image.shape[0] else ((1, out_w), (0, out_h))
  names = iter(("resize_a", "resize_b") * 2)
  result = image
  for axis, out_size in order:
    if result.shape[axis] == out_size:
      continue
    matrix = _resize_matrix(result.shape[axis], out_size, method)
    if axis == 1:
      result = _swap_leading_axes(result, workspace.array(next(names), result.shape))
    result = _resample_rows(result, matrix, workspace.array(
        next(names), (out_size,) + result.shape[1:]))
    if axis == 1:
      result = _swap_leading_axes(result, workspace.array(next(names), result.shape))
  return result


def _normalized_letterbox(pixels: np.ndarray, target: tuple[int, int], cfg: PreprocessConfig,
                          workspace: _Workspace, name: str) -> tuple[np.ndarray, Letterbox]:
  """normalize_image(resize_and_pad(...)) fused: the same float32 operations, fewer passes."""
  box = letterbox_geometry(pixels.shape[0], pixels.shape[1], target)
  resized = _resize(pixels, (box.height, box.width), cfg.resize_method, workspace)
  if resized is pixels:
    resized = workspace.array("resize_a", pixels.shape)
    resized[...] = pixels
  np.clip(resized, 0.0, 1.0, out=resized)
  target_h, target_w = target
  # Per-channel constants tiled along whole rows: broadcasting a 3-vector would make NumPy run
  # its inner loops 3 elements at a time.
  mean_row = np.tile(np.asarray(cfg.image_mean, _F32), target_w)
  std_row = np.tile(np.asarray(cfg.image_std, _F32), target_w)
  pad_row = (_F32(cfg.pad_value) - mean_row) / std_row
  canvas = workspace.array(name, (target_h, target_w * 3))
  canvas[:box.top] = pad_row
  canvas[box.top + box.height:] = pad_row
  band = canvas[box.top:box.top + box.height]
  lo, hi = 3 * box.left, 3 * (box.left + box.width)
  band[:, :lo] = pad_row[:lo]
  band[:, hi:] = pad_row[hi:]
  region = band[:, lo:hi]
  np.subtract(resized.reshape(box.height, -1), mean_row[lo:hi], out=region)
  np.divide(region, std_row[lo:hi], out=region)
  return canvas.reshape(target_h, target_w, 3), box


def _check_method(method: str) -> None:
  if method not in RESIZE_METHODS:
    raise ValueError(f"resize_method: unknown {method!r}; expected one of {RESIZE_METHODS}")


def _resample_rows(image: np.ndarray, matrix: scipy.sparse.csr_matrix,
                   out: np.ndarray) -> np.ndarray:
  """out[i] = sum_j matrix[i, j] * image[j]: resamples axis 0 into the buffer out."""
  flat_in = image.reshape(image.shape[0], -1)
  flat_out = out.reshape(out.shape[0], -1)
  if _csr_matvecs is None:
    np.copyto(flat_out, matrix @ flat_in)
  else:
    flat_out.fill(0)   # csr_matvecs accumulates
    _csr_matvecs(matrix.shape[0], matrix.shape[1], flat_in.shape[1], matrix.indptr,
                 matrix.indices, matrix.data, flat_in.ravel(), flat_out.ravel())
  return out


def _swap_leading_axes(image: np.ndarray, buffer: np.ndarray) -> np.ndarray:
  """[A, B, ch] -> [B, A, ch] in buffer (any shape of that size), moving whole pixels at once:
  NumPy transposes 12-byte items about twice as fast as three 4-byte ones."""
  a, b, ch = image.shape
  pixel = np.dtype((np.void, ch * image.itemsize))
  out = buffer.reshape(b, a, ch)
  np.copyto(out.view(pixel).reshape(b, a), image.view(pixel).reshape(a, b).T)
  return out


@functools.lru_cache(maxsize=512)
def _resize_matrix(in_size: int, out_size: int, method: str) -> scipy.sparse.csr_matrix:
  """[out, in] float32 resampling matrix of one axis (rows sum to 1)."""
  taps = _tensorflow_taps if method == "tensorflow" else _torchvision_taps
  start, weights = taps(in_size, out_size)
  columns = start[:, None] + np.arange(weights.shape[1])
  keep = weights != 0
  indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
  matrix = scipy.sparse.csr_matrix(
      (weights[keep].astype(_F32), columns[keep].astype(np.int32), indptr),
      shape=(out_size, in_size))
  for array in (matrix.data, matrix.indices, matrix.indptr):
    array.flags.writeable = False
  return matrix


def _tensorflow_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """TF ScaleAndTranslate spans for the triangle kernel, float32 as in its C++ kernel."""
  scale = _F32(out_size) / _F32(in_size)
  inv_scale = _F32(1.0 / float(scale))
  kernel_scale = max(inv_scale, _F32(1.0))
  one_over_kernel_scale = _F32(1.0) / kernel_scale
  sample = (np.arange(out_size, dtype=_F32) + _F32(0.5)) * inv_scale
  start = np.clip(np.ceil(sample - kernel_scale - _F32(0.5)).astype(np.int64), 0, in_size - 1)
  end = np.clip(np.floor(sample + kernel_scale - _F32(0.5)).astype(np.int64), 0, in_size - 1) + 1
  source = start[:, None] + np.arange(int((end - start).max()))
  distance = np.abs((source.astype(_F32) + _F32(0.5) - sample[:, None]) * one_over_kernel_scale)
  weights = np.where((distance < 1) & (source < end[:, None]), _F32(1) - distance, _F32(0))
  total = _sequential_sum(weights)
  return start, weights * (_F32(1) / total)[:, None]


def _torchvision_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """torch's antialiased (Pillow-style) bounds and weights; float32 with its double temporaries."""
  scale = _F32(in_size) / _F32(out_size)
  support = scale if scale >= 1 else _F32(1.0)
  inv_scale = _F32(1.0 / float(scale)) if scale >= 1 else _F32(1.0)
  max_taps = int(np.ceil(support)) * 2 + 1
  center = (float(scale) * (np.arange(out_size) + 0.5)).astype(_F32)
  start = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5).astype(np.int64), 0)
  end = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5).astype(np.int64), in_size)
  count = np.clip(end - start, 0, max_taps)
  tap = np.arange(max_taps)
  offset = (start[:, None] + tap).astype(_F32) - center[:, None]
  distance = np.abs(((offset.astype(np.float64) + 0.5) * float(inv_scale)).astype(_F32))
  weights = np.where((distance < 1) & (tap < count[:, None]),
                     (1.0 - distance.astype(np.float64)).astype(_F32), _F32(0))
  total = _sequential_sum(weights)
  safe_total = np.where(total != 0, total, _F32(1))
  return start, weights / safe_total[:, None]


def _sequential_sum(weights: np.ndarray) -> np.ndarray:
  # Left-to-right float32 accumulation, as both reference kernels do (NumPy sums pairwise).
  total = np.zeros(weights.shape[0], _F32)
  for column in weights.T:
    total += column
  return total


# ----------------------------------------------------------------------------------------------
# Crop grid and layout (the reference's olmo/data/model_preprocessor.py: select_tiling; olmo/data/model_preprocessor.py (high-resolution crops); olmo/data/model_preprocessor.py (image_input_idx))
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Sizes derived from a PreprocessConfig (validated by `_geometry`); cells are pooled cells."""

  patch: int
  crop_patches: int                # G
  pool: int
  window_px: int                   # stride between crops
  margin_px: int                   # L + R margins in pixels
  cells: int                       # pooled cells per crop side
  margin_cells: tuple[int, int]    # L, R in pooled cells
  window_cells: int


def _geometry(cfg: PreprocessConfig) -> _Geometry:
  crop, patch, pool = cfg.crop_size, cfg.patch_size, cfg.pool_size
  if min(crop, patch, pool) < 1:
    raise ValueError(f"preprocess: crop_size, patch_size, pool_size must be >= 1, got "
                     f"{(crop, patch, pool)}")
  if crop % patch:
    raise ValueError(f"preprocess.crop_size={crop} is not a multiple of patch_size={patch}")
  crop_patches = crop // patch
  if crop_patches % pool:
    raise ValueError(f"preprocess: {crop_patches} patches per crop side do not pool evenly by "
                     f"pool_size={pool}")
  margins = tuple(int(m) for m in cfg.overlap_margins)
  if len(margins) != 2 or min(margins) < 0 or any(m % pool for m in margins):
    raise ValueError(f"preprocess.overlap_margins={cfg.overlap_margins}: expected two "
                     f"non-negative multiples of pool_size={pool}")
  if crop_patches - sum(margins) < pool:
    raise ValueError(f"preprocess.overlap_margins={cfg.overlap_margins} leave no window inside "
                     f"a {crop_patches}-patch crop")
  window = crop_patches - sum(margins)
  return _Geometry(patch, crop_patches, pool, window_px=patch * window,
                   margin_px=patch * sum(margins), cells=crop_patches // pool,
                   margin_cells=(margins[0] // pool, margins[1] // pool),
                   window_cells=window // pool)


@functools.lru_cache(maxsize=64)
def _candidate_grids(max_crops: int) -> np.ndarray:
  """All (rows, cols) with rows * cols <= max_crops, sorted by (area, rows): int32 [n, 2]."""
  rows, cols = np.meshgrid(np.arange(1, max_crops + 1), np.arange(1, max_crops + 1),
                           indexing="ij")
  keep = rows * cols <= max_crops
  rows, cols = rows[keep], cols[keep]
  order = np.lexsort((rows, rows * cols))
  grids = np.stack([rows[order], cols[order]], axis=1).astype(np.int32)
  grids.flags.writeable = False
  return grids


def select_crop_grid(height: int, width: int, max_crops: int,
                     cfg: PreprocessConfig) -> tuple[int, int]:
  """(rows, cols) of high-res crops for an image (the reference's olmo/data/model_preprocessor.py: select_tiling, pitfall 3).

  Scales are float32 `grid * window_px / (size - margin_px)`; the least up-scaling grid wins, or,
  when every grid must shrink the image, the least down-scaling one; ties go to the first grid in
  (area, rows) order. Sizes at or below margin_px give inf or negative scales, as the reference.
  """
  if int(max_crops) < 1:
    raise ValueError(f"max_crops must be >= 1, got {max_crops}")
  geo = _geometry(cfg)
  grids = _candidate_grids(int(max_crops))
  usable = np.array([height - geo.margin_px, width - geo.margin_px], dtype=_F32)
  with np.errstate(divide="ignore"):
    scales = (grids * geo.window_px).astype(_F32) / usable
  scale = scales.min(axis=1)
  if np.all(scale < 1):
    index = int(np.argmax(scale))
  else:
    index = int(np.argmin(np.where(scale < 1, _F32(1e10), scale)))
  return int(grids[index, 0]), int(grids[index, 1])


@dataclasses.dataclass(frozen=True)
class CropLayout:
  """Everything about an image's crops that does not depend on its pixels.

  feature_rank: int32 [N, Q], see `MultiCropImage.feature_rank`.
  """

  crop_grid: tuple[int, int]
  canvas_size: tuple[int, int]
  pooled_grid: tuple[int, int]
  lowres_grid: tuple[int, int]
  feature_rank: np.ndarray

  @property
  def num_features(self) -> int:
    return int(np.prod(self.lowres_grid) + np.prod(self.pooled_grid))


def crop_layout(height: int, width: int, cfg: PreprocessConfig,
                max_crops: int | None = None) -> CropLayout:
  """Crop grid, canvas, pooled grids and feature ranks for an image of this size."""
  geo = _geometry(cfg)
  rows, cols = select_crop_grid(height, width, cfg.max_crops if max_crops is None else max_crops,
                                cfg)
  canvas = (rows * geo.window_px + geo.margin_px, cols * geo.window_px + geo.margin_px)
  extra = sum(geo.margin_cells)
  pooled = (rows * geo.window_cells + extra, cols * geo.window_cells + extra)
  return CropLayout((rows, cols), canvas, pooled, (geo.cells, geo.cells),
                    _feature_rank(rows, cols, geo))


def _kept_cells(tiles: int, geo: _Geometry) -> np.ndarray:
  """[tiles, cells]: index of each crop's pooled row (or column) in the whole hi-res grid, or -1.

  Crops keep their outer-border cells and drop the margin cells facing a neighbour (the reference's olmo/data/model_preprocessor.py (high-resolution crops)).
  """
  local = np.arange(geo.cells)
  tile = np.arange(tiles)[:, None]
  first = np.where(tile == 0, 0, geo.margin_cells[0])
  last = np.where(tile == tiles - 1, geo.cells, geo.cells - geo.margin_cells[1])
  kept = (local >= first) & (local < last)
  return np.where(kept, tile * geo.window_cells + local, -1)


def _feature_rank(rows: int, cols: int, geo: _Geometry) -> np.ndarray:
  """[N, Q]: global cells 0..Q-1 in raster order, then hi-res cell k of the pooled grid -> Q + k.

  This is the inverse permutation that the reference builds from crop-major ids (the reference's olmo/data/model_preprocessor.py (image_input_idx)).
  """
  cells_per_crop = geo.cells * geo.cells
  row_index = _kept_cells(rows, geo)[:, None, :, None]      # [rows, 1, cells, 1]
  col_index = _kept_cells(cols, geo)[None, :, None, :]      # [1, cols, 1, cells]
  grid_cols = cols * geo.window_cells + sum(geo.margin_cells)
  rank = cells_per_crop + row_index * grid_cols + col_index
  high_res = np.where((row_index >= 0) & (col_index >= 0), rank, IGNORED_INDEX)
  global_view = np.arange(cells_per_crop)[None]
  return np.concatenate([global_view, high_res.reshape(rows * cols, cells_per_crop)]).astype(
      np.int32)


# ----------------------------------------------------------------------------------------------
# Crops, patches, masks (the reference's olmo/data/model_preprocessor.py (high-resolution crops) - the reference's olmo/data/model_preprocessor.py (image_masks))
# ----------------------------------------------------------------------------------------------

def multicrop_image(image: np.ndarray, cfg: PreprocessConfig,
                    max_crops: int | None = None) -> MultiCropImage:
  """Cuts an RGB uint8 [H, W, 3] image into the global view plus overlapping high-res crops.

  Masks follow the released models (the reference's olmo/data/model_preprocessor.py (image_masks)): image k is paired with the mask of crop k, so the
  global view gets crop 0's mask and the last crop an all -1 row. With cfg.fix_image_padding each
  crop gets its own mask and the global view all ones.
  """
  if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
      or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"image: expected a uint8 array [H, W, 3] with H, W >= 1, got "
                     f"{getattr(image, 'dtype', type(image).__name__)} "
                     f"{getattr(image, 'shape', '')}")
  geo = _geometry(cfg)
  height, width = image.shape[:2]
  layout = crop_layout(height, width, cfg, max_crops)
  rows, cols = layout.crop_grid
  workspace = _thread_workspace()
  pixels = to_unit_float(image, cfg.resize_method, out=workspace.array("pixels", image.shape))
  canvas, box = _normalized_letterbox(pixels, layout.canvas_size, cfg, workspace, "canvas")
  # The global view's own validity mask is discarded, as in the reference (the reference's olmo/data/model_preprocessor.py (global view)).
  global_view, _ = _normalized_letterbox(pixels, (cfg.crop_size, cfg.crop_size), cfg, workspace,
                                         "global_view")

  patches = geo.crop_patches ** 2
  images = np.empty((rows * cols + 1, patches, geo.patch * geo.patch * 3), _F32)
  _cut_patches(global_view, (1, 1), geo, images[:1])
  _cut_patches(canvas, (rows, cols), geo, images[1:])

  crop_masks = _crop_patch_masks((rows, cols), box, geo)
  if cfg.fix_image_padding:
    masks = np.concatenate([np.ones((1, patches), _F32), crop_masks])
  else:
    masks = np.concatenate([crop_masks, np.full((1, patches), -1, _F32)])
  return MultiCropImage(images=images, image_masks=masks, feature_rank=layout.feature_rank,
                        crop_grid=layout.crop_grid, pooled_grid=layout.pooled_grid,
                        lowres_grid=layout.lowres_grid, original_size=(width, height))


def _cut_patches(canvas: np.ndarray, grid: tuple[int, int], geo: _Geometry,
                 out: np.ndarray) -> None:
  """Writes crop (r, c) of canvas [Hc, Wc, 3] as out[r * cols + c]: [P, C] in (dy, dx, c) order.

  All crops and patches are one strided view of the canvas, so this is a single copy.
  """
  rows, cols = grid
  sy, sx, sc = canvas.strides
  g, p, w = geo.crop_patches, geo.patch, geo.window_px
  view = as_strided(canvas, shape=(rows, cols, g, g, p, p, 3),
                    strides=(w * sy, w * sx, p * sy, p * sx, sy, sx, sc), writeable=False)
  np.copyto(out.reshape(rows, cols, g, g, p, p, 3), view)


def _crop_patch_masks(grid: tuple[int, int], box: Letterbox, geo: _Geometry) -> np.ndarray:
  """[rows * cols, P] fraction of real (non-letterbox) pixels in each patch of each crop.

  The image area is a rectangle, so a patch's count is (valid rows) * (valid cols); dividing the
  integer count by p*p in float32 equals the reference's float32 mean of the boolean mask.
  """
  rows, cols = grid
  valid_y = _valid_pixels_per_patch(rows, box.top, box.height, geo)     # [rows, G]
  valid_x = _valid_pixels_per_patch(cols, box.left, box.width, geo)     # [cols, G]
  counts = valid_y[:, None, :, None] * valid_x[None, :, None, :]        # [rows, cols, G, G]
  fraction = counts.astype(_F32) / _F32(geo.patch * geo.patch)
  return fraction.reshape(rows * cols, geo.crop_patches ** 2)


def _valid_pixels_per_patch(tiles: int, start: int, length: int, geo: _Geometry) -> np.ndarray:
  first_pixel = (np.arange(tiles)[:, None] * geo.window_px
                 + np.arange(geo.crop_patches)[None, :] * geo.patch)
  overlap = (np.minimum(first_pixel + geo.patch, start + length)
             - np.maximum(first_pixel, start))
  return np.clip(overlap, 0, geo.patch)
