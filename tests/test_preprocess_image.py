"""Image pre-processing (the reference's olmo/data/model_preprocessor.py; olmo/data/model_preprocessor.py (image_input_idx)): loading, resize + letterbox, crop grid, crops, masks,
feature ranks."""

import concurrent.futures
import dataclasses
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from molmo_jax.config import PreprocessConfig
from molmo_jax.preprocess import image as image_lib
from molmo_jax.preprocess.image import (Letterbox, crop_layout, letterbox_geometry, multicrop_image,
                                        normalize_image, resize_and_pad, resize_image,
                                        select_crop_grid, to_unit_float)
from molmo_jax.preprocess.image_io import ImageLoadError, image_size, load_image
from molmo_jax.preprocess.types import IGNORED_INDEX

RELEASE = PreprocessConfig()
TINY = PreprocessConfig(crop_size=32, patch_size=4, pool_size=2, overlap_margins=(2, 2),
                        max_crops=4)
SMALL = PreprocessConfig(crop_size=112, patch_size=14, pool_size=2, overlap_margins=(2, 2))
POOL3 = PreprocessConfig(crop_size=36, patch_size=4, pool_size=3, overlap_margins=(3, 3))


def random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def image_tokens(grid):
  """<im_start> + rows * (cols <im_patch> + <im_col>) + <im_end> (the reference's olmo/data/model_preprocessor.py (image token blocks))."""
  rows, cols = grid
  return 1 + rows * (cols + 1) + 1


def patchify(pixels, patch):
  """[N, S, S, ch] -> [N, P, patch*patch*ch] in (dy, dx, c) order, written independently."""
  n, size, _, ch = pixels.shape
  g = size // patch
  out = np.empty((n, g * g, patch * patch * ch), pixels.dtype)
  for py in range(g):
    for px in range(g):
      block = pixels[:, py * patch:(py + 1) * patch, px * patch:(px + 1) * patch]
      out[:, py * g + px] = block.reshape(n, -1)
  return out


def cut_crops(canvas, grid, cfg):
  """Crops of the canvas in row-major order, by slicing (the reference's olmo/data/model_preprocessor.py (high-resolution crops))."""
  window = cfg.patch_size * (cfg.crop_size // cfg.patch_size - sum(cfg.overlap_margins))
  s = cfg.crop_size
  return np.stack([canvas[r * window:r * window + s, c * window:c * window + s]
                   for r in range(grid[0]) for c in range(grid[1])])


def spec_feature_rank(grid, cfg):
  """the reference's olmo/data/model_preprocessor.py (image_input_idx) transcribed: crop-major ids of kept cells, transpose to raster order, invert."""
  rows, cols = grid
  cells = cfg.crop_size // cfg.patch_size // cfg.pool_size
  left, right = (m // cfg.pool_size for m in cfg.overlap_margins)
  order, counter = [], 0
  for r in range(rows):
    for c in range(cols):
      ids = np.full((cells, cells), -1)
      r0, r1 = (0 if r == 0 else left), (cells if r == rows - 1 else cells - right)
      c0, c1 = (0 if c == 0 else left), (cells if c == cols - 1 else cells - right)
      n = (r1 - r0) * (c1 - c0)
      ids[r0:r1, c0:c1] = counter + np.arange(n).reshape(r1 - r0, c1 - c0)
      counter += n
      order.append(ids)
  crop_major = np.stack(order)
  raster = crop_major.reshape(rows, cols, cells, cells).transpose(0, 2, 1, 3).reshape(-1)
  rank_of_id = np.empty(counter, int)
  rank_of_id[raster[raster >= 0]] = np.arange(counter)
  q = cells * cells
  flat = crop_major.reshape(rows * cols, q)
  high = np.where(flat >= 0, q + rank_of_id[np.maximum(flat, 0)], IGNORED_INDEX)
  return np.concatenate([np.arange(q)[None], high])


# ------------------------------------------------------------------------------------------
# Worked examples (the reference's olmo/data/model_preprocessor.py (image token counts))
# ------------------------------------------------------------------------------------------

# (h, w), max_crops, grid, canvas, crops incl. global, pooled grid, valid features, image tokens
WORKED_EXAMPLES = [
    ((336, 336), 12, (1, 1), (336, 336), 2, (12, 12), 288, 316),
    ((336, 336), 36, (1, 1), (336, 336), 2, (12, 12), 288, 316),
    ((100, 100), 12, (1, 1), (336, 336), 2, (12, 12), 288, 316),
    ((100, 100), 36, (1, 1), (336, 336), 2, (12, 12), 288, 316),
    ((448, 448), 12, (2, 2), (560, 560), 5, (20, 20), 544, 580),
    ((448, 448), 36, (2, 2), (560, 560), 5, (20, 20), 544, 580),
    ((480, 640), 12, (2, 3), (560, 784), 7, (20, 28), 704, 740),
    ((480, 640), 36, (2, 3), (560, 784), 7, (20, 28), 704, 740),
    ((768, 1024), 12, (3, 4), (784, 1008), 13, (28, 36), 1152, 1196),
    ((768, 1024), 36, (3, 5), (784, 1232), 16, (28, 44), 1376, 1420),
    ((1080, 1920), 12, (3, 4), (784, 1008), 13, (28, 36), 1152, 1196),
    ((1080, 1920), 36, (4, 8), (1008, 1904), 33, (36, 68), 2592, 2644),
    ((2000, 500), 12, (6, 2), (1456, 560), 13, (52, 20), 1184, 1252),
    ((4000, 3000), 36, (7, 5), (1680, 1232), 36, (60, 44), 2784, 2860),
]


@pytest.mark.parametrize("size,max_crops,grid,canvas,crops,pooled,features,tokens", WORKED_EXAMPLES)
def test_worked_examples(size, max_crops, grid, canvas, crops, pooled, features, tokens):
  out = multicrop_image(np.full(size + (3,), 127, np.uint8), RELEASE, max_crops=max_crops)
  assert out.crop_grid == grid
  assert crop_layout(*size, RELEASE, max_crops).canvas_size == canvas
  assert out.num_crops == crops
  assert out.images.shape == (crops, 576, 588) and out.image_masks.shape == (crops, 576)
  assert out.pooled_grid == pooled and out.lowres_grid == (12, 12)
  assert int((out.feature_rank >= 0).sum()) == features == out.num_features
  assert image_tokens(out.lowres_grid) + image_tokens(out.pooled_grid) == tokens
  assert out.original_size == (size[1], size[0])


def test_tallest_grid_gives_the_token_upper_bound():
  layout = crop_layout(5000, 300, RELEASE, 12)
  assert layout.crop_grid == (12, 1) and layout.pooled_grid == (100, 12)
  assert image_tokens(layout.lowres_grid) + image_tokens(layout.pooled_grid) == 1460


# ------------------------------------------------------------------------------------------
# Crop grid selection (the reference's olmo/data/model_preprocessor.py: select_tiling)
# ------------------------------------------------------------------------------------------

def spec_select_grid(h, w, max_crops, cfg):
  """the reference's olmo/data/model_preprocessor.py: select_tiling in words, one candidate at a time."""
  patches = cfg.crop_size // cfg.patch_size
  window = cfg.patch_size * (patches - sum(cfg.overlap_margins))
  margin = cfg.patch_size * sum(cfg.overlap_margins)
  grids = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1)
                  if i * j <= max_crops), key=lambda g: (g[0] * g[1], g[0]))
  with np.errstate(divide="ignore"):
    scales = [min(np.float32(i * window) / np.float32(h - margin),
                  np.float32(j * window) / np.float32(w - margin)) for i, j in grids]
  if all(s < 1 for s in scales):
    best = max(scales)
  else:
    best = min(s for s in scales if s >= 1)
  return grids[scales.index(best)]   # first candidate reaching the optimum


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 6000), w=st.integers(1, 6000), max_crops=st.integers(1, 40),
       cfg=st.sampled_from([RELEASE, SMALL, TINY, POOL3]))
def test_select_crop_grid_matches_spec(h, w, max_crops, cfg):
  assert select_crop_grid(h, w, max_crops, cfg) == spec_select_grid(h, w, max_crops, cfg)


def test_select_crop_grid_ties_go_to_fewer_crops_then_fewer_rows():
  # 784 - 112 = 672 = 3 * 224: 3x3, 3x4 and 4x3 all need scale 1.0; 3x3 is first.
  assert select_crop_grid(784, 784, 12, RELEASE) == (3, 3)
  # Every grid shrinks a 5000 px square; 3x3, 3x4, 4x3 tie on the largest scale.
  assert select_crop_grid(5000, 5000, 12, RELEASE) == (3, 3)
  assert select_crop_grid(112, 112, 12, RELEASE) == (1, 1)   # zero usable size: inf scales
  assert select_crop_grid(1, 12, 12, RELEASE) == (1, 1)      # negative scales


# ------------------------------------------------------------------------------------------
# Feature ranks (the reference's olmo/data/model_preprocessor.py (image_input_idx))
# ------------------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(h=st.integers(1, 6000), w=st.integers(1, 6000), max_crops=st.integers(1, 40),
       cfg=st.sampled_from([RELEASE, SMALL, TINY, POOL3]))
def test_feature_rank_numbers_every_kept_cell_once(h, w, max_crops, cfg):
  layout = crop_layout(h, w, cfg, max_crops)
  rows, cols = layout.crop_grid
  cells = cfg.crop_size // cfg.patch_size // cfg.pool_size
  q = cells * cells
  rank = layout.feature_rank
  assert rows * cols <= max_crops
  assert rank.shape == (rows * cols + 1, q) and rank.dtype == np.int32
  kept = np.sort(rank[rank >= 0])
  assert np.array_equal(kept, np.arange(layout.num_features))
  assert set(np.unique(rank[rank < 0])) <= {IGNORED_INDEX}
  # Each kept crop cell is numbered by its own position in the hi-res pooled grid.
  window_cells = cells - sum(cfg.overlap_margins) // cfg.pool_size
  crop, cell = np.nonzero(rank[1:] >= 0)
  r, c = np.divmod(crop, cols)
  i, j = np.divmod(cell, cells)
  grid_row, grid_col = np.divmod(rank[1:][crop, cell] - q, layout.pooled_grid[1])
  assert np.array_equal(grid_row, r * window_cells + i)
  assert np.array_equal(grid_col, c * window_cells + j)
  np.testing.assert_array_equal(rank, spec_feature_rank(layout.crop_grid, cfg))


# ------------------------------------------------------------------------------------------
# Resize and letterbox (the reference's olmo/data/model_preprocessor.py: resize_and_pad)
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["tensorflow", "torchvision"])
def test_resize_hand_computed(method):
  a, b, c, d = 0.1, 0.4, 0.2, 0.9
  row = np.array([a, b, c, d], np.float32).reshape(1, 4, 1)
  # 4 -> 2: the triangle is twice as wide; output 0 samples x=1 (weights .75 .75 .25 on
  # pixels 0, 1, 2, renormalised by 1.75), output 1 samples x=3.
  np.testing.assert_allclose(resize_image(row, (1, 2), method)[0, :, 0],
                             [(3 * a + 3 * b + c) / 7, (b + 3 * c + 3 * d) / 7], rtol=1e-6)
  # 2 -> 3: plain linear interpolation with the edge samples clamped.
  pair = np.array([a, d], np.float32).reshape(1, 2, 1)
  np.testing.assert_allclose(resize_image(pair, (1, 3), method)[0, :, 0], [a, (a + d) / 2, d],
                             rtol=1e-6)
  # Separable: the 2-D resize is the 1-D weights applied along each axis.
  square = np.outer([a, b, c, d], [d, c, b, a]).astype(np.float32)[:, :, None]
  weights = np.array([[3, 3, 1, 0], [0, 1, 3, 3]]) / 7
  np.testing.assert_allclose(resize_image(square, (2, 2), method)[:, :, 0],
                             weights @ square[:, :, 0] @ weights.T, rtol=1e-6)


RESIZE_CASES = [((768, 1024), (252, 336)), ((60, 37), (336, 207)), ((97, 300), (11, 34)),
                ((40, 40), (40, 17)), ((5, 7), (13, 3)), ((1, 1), (32, 32))]


@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_tensorflow_method_matches_jax_antialiased_resize(shape, size):
  jax = pytest.importorskip("jax")
  x = np.random.default_rng(1).random(shape + (3,), dtype=np.float32)
  expected = np.asarray(jax.image.resize(x, size + (3,), "bilinear", antialias=True))
  np.testing.assert_allclose(resize_image(x, size, "tensorflow"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_tensorflow_method_matches_tensorflow(shape, size):
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(2).random(shape + (3,), dtype=np.float32)
  expected = tf.image.resize(x, size, method="bilinear", antialias=True).numpy()
  np.testing.assert_allclose(resize_image(x, size, "tensorflow"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,size", RESIZE_CASES)
def test_torchvision_method_matches_torch_interpolate(shape, size):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(3).random(shape + (3,), dtype=np.float32)
  expected = torch.nn.functional.interpolate(
      torch.from_numpy(x).permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True,
      align_corners=False)[0].permute(1, 2, 0).numpy()
  np.testing.assert_allclose(resize_image(x, size, "torchvision"), expected, atol=1e-6, rtol=0)


def test_sparse_product_fallback_gives_the_same_pixels(monkeypatch):
  x = np.random.default_rng(4).random((50, 70, 3), dtype=np.float32)
  fast = resize_image(x, (20, 90))
  monkeypatch.setattr(image_lib, "_csr_matvecs", None)
  np.testing.assert_array_equal(resize_image(x, (20, 90)), fast)


def test_letterbox_is_centred_with_the_odd_pixel_at_bottom_right():
  x = np.random.default_rng(5).random((100, 51, 3), dtype=np.float32)
  padded, mask = resize_and_pad(x, (60, 61), pad_value=0.25)
  assert letterbox_geometry(100, 51, (60, 61)) == Letterbox(height=60, width=30, top=0, left=15)
  assert mask[:, 15:45].all() and not mask[:, :15].any() and not mask[:, 45:].any()
  assert (padded[:, :15] == 0.25).all() and (padded[:, 45:] == 0.25).all()   # 15 left, 16 right
  np.testing.assert_array_equal(padded[:, 15:45], np.clip(resize_image(x, (60, 30)), 0, 1))


def test_scaled_size_uses_float32_and_truncation():
  # 131 * float32(336 / 131) = 335.99997 in float32: the reference letterboxes one pixel row.
  assert letterbox_geometry(131, 100, (336, 336)) == Letterbox(335, 256, 0, 40)
  assert letterbox_geometry(1, 1000, (336, 336)).height == 1   # would truncate to 0


def test_resize_clips_overshoot_to_unit_range():
  x = np.zeros((9, 9, 3), np.float32)
  x[4, 4] = 1.0
  padded, _ = resize_and_pad(x * 3 - 1, (5, 5))
  assert padded.min() >= 0.0 and padded.max() <= 1.0


# ------------------------------------------------------------------------------------------
# Crops, patches and masks (the reference's olmo/data/model_preprocessor.py (high-resolution crops) - the reference's olmo/data/model_preprocessor.py (image_masks))
# ------------------------------------------------------------------------------------------

def reference_pipeline(pixels_uint8, cfg, max_crops=None):
  """The spec's steps with the public pieces, no fusion: (images [N, P, C], crop masks)."""
  h, w = pixels_uint8.shape[:2]
  layout = crop_layout(h, w, cfg, max_crops)
  x = to_unit_float(pixels_uint8, cfg.resize_method)
  canvas, mask = resize_and_pad(x, layout.canvas_size, cfg.resize_method, cfg.pad_value)
  global_view, _ = resize_and_pad(x, (cfg.crop_size,) * 2, cfg.resize_method, cfg.pad_value)
  views = np.concatenate([global_view[None], cut_crops(canvas, layout.crop_grid, cfg)])
  images = patchify(normalize_image(views, cfg.image_mean, cfg.image_std), cfg.patch_size)
  crop_masks = patchify(cut_crops(mask[:, :, None], layout.crop_grid, cfg).astype(np.float32),
                        cfg.patch_size).mean(axis=-1)
  return images, crop_masks


@pytest.mark.parametrize("cfg,size", [(SMALL, (60, 200)), (SMALL, (300, 170)), (TINY, (50, 23)),
                                      (POOL3, (40, 100)), (RELEASE, (500, 700))])
def test_multicrop_equals_the_unfused_pipeline(cfg, size):
  pixels = random_image(*size, seed=6)
  out = multicrop_image(pixels, cfg)
  images, crop_masks = reference_pipeline(pixels, cfg)
  np.testing.assert_array_equal(out.images, images)
  # Released pairing: image k gets crop k's mask, the last crop an all -1 row (the reference's olmo/data/model_preprocessor.py (image_masks)).
  np.testing.assert_array_equal(out.image_masks[:-1], crop_masks)
  assert (out.image_masks[-1] == -1).all()


def test_mask_off_by_one_on_a_letterboxed_image():
  pixels = random_image(80, 400, seed=7)   # 1x7 grid, letterbox rows above and below
  out = multicrop_image(pixels, SMALL)
  _, crop_masks = reference_pipeline(pixels, SMALL)
  assert out.num_crops > 2 and (crop_masks[0] < 1).any()
  np.testing.assert_array_equal(out.image_masks[0], crop_masks[0])       # global <- crop 0
  np.testing.assert_array_equal(out.image_masks[1], crop_masks[1])       # crop 0 <- crop 1
  assert (out.image_masks[-1] == -1).all()                               # last crop <- -1
  fixed = multicrop_image(pixels, dataclasses.replace(SMALL, fix_image_padding=True))
  assert (fixed.image_masks[0] == 1).all()
  np.testing.assert_array_equal(fixed.image_masks[1:], crop_masks)
  np.testing.assert_array_equal(fixed.images, out.images)


def test_patches_are_dy_dx_channel_windows_of_the_canvas():
  # 32x48 with the tiny config needs no resize: the canvas is the image itself (1x2 grid).
  pixels = random_image(32, 48, seed=8)
  out = multicrop_image(pixels, TINY)
  assert out.crop_grid == (1, 2)
  norm = normalize_image(to_unit_float(pixels), TINY.image_mean, TINY.image_std)
  for crop, x0 in ((1, 0), (2, 16)):
    patches = out.images[crop].reshape(8, 8, 4, 4, 3)
    for py, px in ((0, 0), (3, 5), (7, 7)):
      np.testing.assert_array_equal(patches[py, px],
                                    norm[4 * py:4 * py + 4, x0 + 4 * px:x0 + 4 * px + 4])


def test_padding_is_pad_value_before_normalisation():
  pixels = np.full((20, 200, 3), 255, np.uint8)
  out = multicrop_image(pixels, SMALL)
  expected = (np.float32(SMALL.pad_value) - np.float32(SMALL.image_mean)) / np.float32(
      SMALL.image_std)
  top_patch = out.images[0, 0].reshape(-1, 3)   # the global view's first rows are letterbox
  np.testing.assert_array_equal(top_patch, np.broadcast_to(expected, top_patch.shape))
  np.testing.assert_allclose(expected, [-1.7923, -1.7521, -1.4802], atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 160), w=st.integers(1, 160), max_crops=st.integers(1, 8),
       seed=st.integers(0, 2 ** 16), method=st.sampled_from(["tensorflow", "torchvision"]))
def test_multicrop_shapes_and_ranges_on_random_tiny_images(h, w, max_crops, seed, method):
  cfg = dataclasses.replace(TINY, resize_method=method)
  out = multicrop_image(random_image(h, w, seed), cfg, max_crops=max_crops)
  rows, cols = out.crop_grid
  n = rows * cols + 1
  assert out.images.shape == (n, 64, 48) and out.images.dtype == np.float32
  assert out.image_masks.shape == (n, 64) and out.feature_rank.shape == (n, 16)
  assert np.isfinite(out.images).all()
  lo = (0 - np.max(cfg.image_mean)) / np.min(cfg.image_std)
  hi = (1 - np.min(cfg.image_mean)) / np.min(cfg.image_std)
  assert out.images.min() >= lo - 1e-5 and out.images.max() <= hi + 1e-5
  assert ((out.image_masks[:-1] >= 0) & (out.image_masks[:-1] <= 1)).all()
  assert (out.image_masks[-1] == -1).all()
  assert np.array_equal(np.sort(out.feature_rank[out.feature_rank >= 0]),
                        np.arange(out.num_features))
  assert out.original_size == (w, h)


def test_results_do_not_share_scratch_memory_across_calls_or_threads():
  images = [random_image(h, w, seed) for seed, (h, w) in enumerate([(70, 90), (33, 120), (90, 50)])]
  sequential = [multicrop_image(x, TINY) for x in images]
  kept = [out.images.copy() for out in sequential]
  multicrop_image(random_image(150, 150, 9), TINY)   # reuses (and grows) the scratch buffers
  for out, before in zip(sequential, kept):
    np.testing.assert_array_equal(out.images, before)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    threaded = list(pool.map(lambda x: multicrop_image(x, TINY), images * 4))
  for out, before in zip(threaded, kept * 4):
    np.testing.assert_array_equal(out.images, before)


@pytest.mark.parametrize("size", [(1, 1), (12, 1), (1, 12), (3000, 40)])
def test_degenerate_sizes(size):
  out = multicrop_image(random_image(*size), RELEASE)
  assert out.images.shape[1:] == (576, 588) and np.isfinite(out.images).all()
  assert (out.image_masks[:-1] > 0).any()   # some real pixels survive in every case


def test_bad_config_and_inputs_are_named():
  with pytest.raises(ValueError, match="crop_size"):
    select_crop_grid(10, 10, 4, PreprocessConfig(crop_size=30, patch_size=4))
  with pytest.raises(ValueError, match="overlap_margins"):
    select_crop_grid(10, 10, 4, PreprocessConfig(overlap_margins=(3, 4)))
  with pytest.raises(ValueError, match="overlap_margins"):
    select_crop_grid(10, 10, 4, PreprocessConfig(overlap_margins=(12, 12)))
  with pytest.raises(ValueError, match="max_crops"):
    select_crop_grid(10, 10, 0, RELEASE)
  with pytest.raises(ValueError, match="resize_method"):
    multicrop_image(random_image(8, 8), PreprocessConfig(resize_method="cubic"))
  with pytest.raises(ValueError, match="image"):
    multicrop_image(np.zeros((8, 8, 3), np.float32), RELEASE)


# ------------------------------------------------------------------------------------------
# Loading (the reference's olmo/data/model_preprocessor.py (image loading))
# ------------------------------------------------------------------------------------------

def encode(image, fmt="PNG", **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def test_load_from_path_bytes_pil_and_array(tmp_path):
  pixels = random_image(9, 13)
  path = tmp_path / "x.png"
  Image.fromarray(pixels).save(path)
  for src in (str(path), path, path.read_bytes(), Image.open(path), pixels):
    out = load_image(src)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, pixels)


def test_exif_orientation_is_applied():
  pixels = random_image(6, 10)
  exif = Image.Exif()
  exif[0x0112] = 6   # "rotate 90 degrees clockwise to display"
  out = load_image(encode(Image.fromarray(pixels), "PNG", exif=exif))
  np.testing.assert_array_equal(out, np.rot90(pixels, k=-1))


def test_modes_convert_deterministically():
  assert load_image(Image.new("L", (2, 2), 7))[0, 0].tolist() == [7, 7, 7]
  assert load_image(Image.new("1", (2, 2), 1))[0, 0].tolist() == [255, 255, 255]
  assert load_image(Image.new("I;16", (2, 2), 257))[0, 0].tolist() == [1, 1, 1]
  assert load_image(Image.new("I", (2, 2), 70000))[0, 0].tolist() == [255, 255, 255]
  assert load_image(Image.new("I", (2, 2), 32896))[0, 0].tolist() == [128, 128, 128]
  assert load_image(Image.new("F", (2, 2), 3.7))[0, 0].tolist() == [3, 3, 3]
  assert load_image(Image.new("CMYK", (2, 2), (0, 0, 0, 0)))[0, 0].tolist() == [255, 255, 255]
  palette = Image.new("P", (2, 2), 1)
  palette.putpalette([0, 0, 0, 250, 120, 10] + [0] * 762)
  assert load_image(palette)[0, 0].tolist() == [250, 120, 10]
  grey = np.arange(6, dtype=np.uint8).reshape(2, 3)
  np.testing.assert_array_equal(load_image(grey), np.repeat(grey[:, :, None], 3, axis=2))
  np.testing.assert_array_equal(load_image(grey[:, :, None]), load_image(grey))


def alpha_images():
  """Images with alpha whose transparent pixels hide a colour (the case the two modes differ on)."""
  rgba = np.zeros((3, 4, 4), np.uint8)
  rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 50
  rgba[..., 3] = np.array([0, 128, 255, 7], np.uint8)
  palette = Image.new("P", (4, 3), 1)
  palette.putpalette([0, 0, 0, 250, 120, 10] + [0] * 762)
  palette.info["transparency"] = 1
  palette_alpha = Image.new("PA", (4, 3), (1, 60))
  palette_alpha.putpalette([0, 0, 0, 250, 120, 10] + [0] * 762)
  return {"RGBA": Image.fromarray(rgba, "RGBA"), "LA": Image.fromarray(rgba[..., [0, 3]], "LA"),
          "P+transparency": palette, "PA": palette_alpha,
          "RGBa": Image.frombytes("RGBa", (4, 3), rgba.tobytes())}


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P+transparency", "PA", "RGBa"])
def test_alpha_is_dropped_as_pil_convert_rgb_by_default(kind, tmp_path):
  image = alpha_images()[kind]
  expected = np.asarray(image.convert("RGB"))   # what the reference's load_image does
  assert load_image(image).tolist() == expected.tolist()
  if kind not in ("RGBa", "PA"):   # Pillow cannot save these as PNG
    path = tmp_path / "alpha.png"
    image.save(path)
    assert load_image(path).tolist() == np.asarray(Image.open(path).convert("RGB")).tolist()
    assert load_image(path.read_bytes()).tolist() == load_image(path).tolist()


def test_alpha_compositing_option():
  images = alpha_images()
  rgba = np.asarray(images["RGBA"])
  # round((c * a + bg * (255 - a)) / 255) per channel
  over_black = load_image(images["RGBA"], alpha="composite")
  assert over_black[0].tolist() == [[0, 0, 0], [100, 50, 25], [200, 100, 50], [5, 3, 1]]
  over_white = load_image(images["RGBA"], alpha="composite", background=(255, 255, 255))
  assert over_white[0, :2].tolist() == [[255, 255, 255], [227, 177, 152]]
  assert load_image(rgba, alpha="composite").tolist() == over_black.tolist()
  assert load_image(rgba).tolist() == rgba[..., :3].tolist()          # arrays drop it too
  assert load_image(images["LA"], alpha="composite")[0, 1].tolist() == [100, 100, 100]
  assert load_image(images["P+transparency"], alpha="composite")[0, 0].tolist() == [0, 0, 0]
  assert load_image(images["P+transparency"], alpha="composite",
                    background=(9, 8, 7))[0, 0].tolist() == [9, 8, 7]
  # Premultiplied RGBa already holds c * a / 255: over black it is kept as stored.
  assert load_image(images["RGBa"], alpha="composite")[0].tolist() == rgba[0, :, :3].tolist()
  la_premultiplied = Image.frombytes("La", (1, 1), bytes([90, 255]))
  assert load_image(la_premultiplied).tolist() == [[[90, 90, 90]]]
  with pytest.raises(ValueError, match="alpha: expected one of"):
    load_image(rgba, alpha="blend")
  with pytest.raises(ValueError, match="background: expected three integers"):
    load_image(rgba, alpha="composite", background=(256, 0, 0))


def test_image_size_reads_the_oriented_size_without_decoding(tmp_path):
  pixels = random_image(6, 10)
  exif = Image.Exif()
  exif[0x0112] = 6
  data = encode(Image.fromarray(pixels), "JPEG", exif=exif)
  assert image_size(data) == (6, 10) == load_image(data).shape[1::-1]
  assert image_size(pixels) == (10, 6)
  path = tmp_path / "x.png"
  Image.fromarray(pixels).save(path)
  assert image_size(path) == (10, 6) == image_size(Image.open(path))
  with pytest.raises(ImageLoadError, match="nope.png"):
    image_size(tmp_path / "nope.png")


def test_bad_inputs_raise_image_load_error_naming_the_source(tmp_path, monkeypatch):
  jpeg = encode(Image.fromarray(random_image(64, 64)), "JPEG")
  with pytest.raises(ImageLoadError, match="corrupt.bin"):
    load_image(b"definitely not an image", name="corrupt.bin")
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(jpeg[:len(jpeg) // 2])
  with pytest.raises(ImageLoadError, match="truncated.jpg"):
    load_image(truncated)
  with pytest.raises(ImageLoadError, match="no pixels"):
    load_image(Image.new("RGB", (0, 5)))
  with pytest.raises(ImageLoadError, match="no pixels"):
    load_image(np.zeros((0, 5, 3), np.uint8))
  with pytest.raises(ImageLoadError, match="LAB"):
    load_image(Image.new("LAB", (2, 2)), name="lab image")
  with pytest.raises(ImageLoadError, match="dtype float32"):
    load_image(np.zeros((4, 4, 3), np.float32))
  with pytest.raises(ImageLoadError, match=r"\(4, 4, 2\)"):
    load_image(np.zeros((4, 4, 2), np.uint8))
  with pytest.raises(ImageLoadError, match="int"):
    load_image(12345)
  with pytest.raises(ImageLoadError, match="missing.png"):
    load_image(tmp_path / "missing.png")
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
  with pytest.raises(ImageLoadError, match="bomb.png.*MAX_IMAGE_PIXELS"), \
      pytest.warns(Image.DecompressionBombWarning):
    load_image(encode(Image.new("RGB", (40, 40))), name="bomb.png")     # 1600 > limit
  with pytest.raises(ImageLoadError, match="bomb2.png.*decompression bomb"):
    load_image(encode(Image.new("RGB", (64, 64))), name="bomb2.png")    # > 2x: Pillow's own error
