"""Loading images from files, bytes, PIL images or arrays into RGB uint8 arrays (spec §1.2).

Legend: H, W = image height and width in pixels after EXIF orientation.

`load_image` returns a C-contiguous uint8 array [H, W, 3]. Point coordinates (spec §7.4) are
relative to this (post-EXIF) size, so every later step must start from it.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import ExifTags, Image, ImageOps

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]

# Modes Pillow converts to RGB correctly on its own (no alpha to handle, no range to rescale).
_PLAIN_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV", "F"})
# Modes with a straight (not premultiplied) alpha band; Pillow converts all of them to RGBA.
_ALPHA_MODES = frozenset({"LA", "PA", "RGBA"})
# Premultiplied alpha: the colour bands already equal the image composited on black.
_PREMULTIPLIED_MODES = frozenset({"La", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
SUPPORTED_MODES = _PLAIN_MODES | _ALPHA_MODES | _PREMULTIPLIED_MODES | _SIXTEEN_BIT_MODES


# Pillow's decompression-bomb limit, raised (or lifted with 0) by the tools' --max-image-pixels
# flag or the MOLMO_JAX_MAX_IMAGE_PIXELS environment variable (for train.py's data loaders).
DEFAULT_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS
MAX_PIXELS_ENV = "MOLMO_JAX_MAX_IMAGE_PIXELS"


def set_max_image_pixels(limit: int | None) -> None:
  """Sets PIL.Image.MAX_IMAGE_PIXELS for this process (None or 0: no limit)."""
  if limit is not None and int(limit) < 0:
    raise ValueError(f"max image pixels: expected >= 0, got {limit}")
  Image.MAX_IMAGE_PIXELS = int(limit) if limit else None


def _limit_from_environment() -> None:
  text = os.environ.get(MAX_PIXELS_ENV, "").strip()
  if not text:
    return
  try:
    set_max_image_pixels(int(text))
  except ValueError:
    raise ValueError(f"{MAX_PIXELS_ENV}={text!r}: expected a pixel count >= 0 (0 = no limit)"
                     ) from None


_limit_from_environment()


class ImageLoadError(ValueError):
  """An image could not be turned into RGB pixels; the message names the source."""


def load_image(src: ImageSource, *, name: str | None = None) -> np.ndarray:
  """Returns the image as uint8 [H, W, 3], EXIF orientation applied.

  Args:
    src: a file path, the encoded file's bytes, a PIL image, or a uint8 array [H, W], [H, W, 1],
      [H, W, 3] or [H, W, 4] (RGBA). Arrays carry no EXIF data and are taken as they are.
    name: how errors refer to the source (default: the path, or a short description).

  Conversion to RGB is deterministic:
    * alpha (LA, PA, RGBA, RGBA arrays, and palette/L/RGB images with a `transparency` key) is
      composited on black: channel = round(channel * alpha / 255). Premultiplied modes (La,
      RGBa) already hold that product and keep their colour bands;
    * 16-bit modes (I;16*) and 32-bit integer mode I (how Pillow opens 16-bit PNG and TIFF
      greyscale) are read as 0..65535 and mapped to round(value / 257), clipped first for I;
    * F (32-bit float) follows Pillow's own F -> L conversion (0..255 scale, clipped);
    * 1, L, P, RGBX, CMYK, YCbCr and HSV use Pillow's converters (CMYK without colour profile).
  Other modes (LAB, multi-band float, ...) are refused rather than silently mis-converted.

  Pillow's decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) stays on and is enforced
  strictly: images with more pixels are refused (Pillow itself only warns below twice the limit).

  Raises:
    ImageLoadError: the source is unreadable, corrupt or truncated, has no pixels, exceeds the
      pixel limit, has an unsupported mode, or is an array of the wrong shape or dtype.
  """
  if isinstance(src, np.ndarray):
    return _array_to_rgb(src, name or f"<array shape={src.shape} dtype={src.dtype}>")
  if isinstance(src, Image.Image):
    return _to_rgb(src, name or f"<PIL image mode={src.mode} size={src.size}>")
  if isinstance(src, (bytes, bytearray, memoryview)):
    data = bytes(src)
    return _open_and_convert(lambda: Image.open(io.BytesIO(data)), name or f"<{len(data)} bytes>")
  if isinstance(src, (str, os.PathLike)):
    return _open_and_convert(lambda: Image.open(src), name or repr(os.fspath(src)))
  raise ImageLoadError(
      f"{name or 'image source'}: expected a path, bytes, PIL image or uint8 array, got "
      f"{type(src).__name__}")


def _open_and_convert(open_image, label: str) -> np.ndarray:
  try:
    image = open_image()
  except Image.DecompressionBombError as e:
    raise ImageLoadError(f"{label}: refused as a decompression bomb ({e}; raise the limit with "
                         f"--max-image-pixels or {MAX_PIXELS_ENV} if the file is trusted)") from e
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise ImageLoadError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e
  with image:   # closes the file of multi-frame images too
    return _to_rgb(image, label)


def _to_rgb(image: Image.Image, label: str) -> np.ndarray:
  _check_size(image, label)
  try:
    image.load()   # decode now so truncated data fails here, inside the handler
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise ImageLoadError(f"{label}: cannot decode image ({type(e).__name__}: {e})") from e
  image = _apply_exif_orientation(image)
  if image.mode not in SUPPORTED_MODES:
    raise ImageLoadError(
        f"{label}: unsupported image mode {image.mode!r}; supported: {sorted(SUPPORTED_MODES)}")
  try:
    return _pil_to_rgb(image)
  except (OSError, ValueError) as e:
    raise ImageLoadError(f"{label}: cannot convert mode {image.mode!r} to RGB ({e})") from e


def _check_size(image: Image.Image, label: str) -> None:
  width, height = image.size
  if width <= 0 or height <= 0:
    raise ImageLoadError(f"{label}: image has no pixels (size {width}x{height})")
  limit = Image.MAX_IMAGE_PIXELS
  if limit is not None and width * height > limit:
    raise ImageLoadError(
        f"{label}: {width}x{height} = {width * height} pixels exceeds PIL.Image.MAX_IMAGE_PIXELS "
        f"= {limit} (possible decompression bomb; raise the limit with --max-image-pixels or "
        f"{MAX_PIXELS_ENV} if the file is trusted)")


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
  # The reference ignores unreadable EXIF blocks rather than failing the example; so do we.
  # exif_transpose copies even upright images, hence the look at the tag first.
  try:
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
      return image
    return ImageOps.exif_transpose(image)
  except Exception:  # noqa: BLE001 - any EXIF parsing failure means "no orientation"
    return image


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
  mode = image.mode
  if mode in _SIXTEEN_BIT_MODES:
    return _grey_to_rgb(_sixteen_to_eight_bits(np.asarray(image)))
  if mode in _PREMULTIPLIED_MODES:
    bands = np.asarray(image)
    return _grey_to_rgb(bands[..., 0]) if mode == "La" else np.ascontiguousarray(bands[..., :3])
  if mode in _ALPHA_MODES or "transparency" in image.info:
    return _composite_on_black(np.asarray(image.convert("RGBA")))
  if mode == "F":
    image = image.convert("L")
  return np.array(image.convert("RGB"), dtype=np.uint8, order="C")


def _array_to_rgb(array: np.ndarray, label: str) -> np.ndarray:
  if array.dtype != np.uint8:
    raise ImageLoadError(
        f"{label}: expected a uint8 array, got dtype {array.dtype}; convert it first, e.g. "
        f"(x * 255).round().astype(np.uint8) for floats in [0, 1]")
  shape_ok = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
  if not shape_ok:
    raise ImageLoadError(f"{label}: expected shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], "
                         f"got {array.shape}")
  if array.shape[0] == 0 or array.shape[1] == 0:
    raise ImageLoadError(f"{label}: image has no pixels (shape {array.shape})")
  if array.ndim == 2 or array.shape[2] == 1:
    return _grey_to_rgb(array.reshape(array.shape[:2]))
  if array.shape[2] == 4:
    return _composite_on_black(array)
  return np.ascontiguousarray(array)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
  return np.repeat(grey[:, :, None], 3, axis=2)


def _sixteen_to_eight_bits(values: np.ndarray) -> np.ndarray:
  wide = np.clip(values.astype(np.int64), 0, 65535)
  return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_black(rgba: np.ndarray) -> np.ndarray:
  rgb = rgba[..., :3].astype(np.uint32)
  alpha = rgba[..., 3:4].astype(np.uint32)
  return ((rgb * alpha + 127) // 255).astype(np.uint8)
