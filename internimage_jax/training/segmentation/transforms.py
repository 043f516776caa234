"""mmseg's ADE20K train and test pipelines on the host (spec ``segmentation.md`` section 7),
per example in numpy, deterministic given a ``np.random.Generator``.

Images stay RGB uint8 throughout (mmseg works on BGR; every step here is either
channel-symmetric or reads the channels in mmseg's order, so the pixels are the same).
Normalisation, and the "0 after normalisation" padding, happen on the device from ``size``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image

from internimage_jax.training.sources import DataError

IGNORE = 255


# --- resizing (OpenCV semantics) --------------------------------------------------------------


def _linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source indices and weights of OpenCV's INTER_LINEAR along one axis: half-pixel
  centres, clamped at 0 below and n-1 above, no antialias."""
  src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
  src = np.maximum(src, 0.0)
  i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  frac = src - i0
  frac[i0 == n_in - 1] = 0.0  # past the last centre: the edge pixel itself
  return i0, i1, frac


def resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of ``[H, W, ...]`` to ``size = (new_h, new_w)`` in float64."""
  new_h, new_w = size
  if new_h < 1 or new_w < 1:
    raise ValueError(f"resize to {size}: sizes must be positive")
  x = np.asarray(array, np.float64)
  y0, y1, fy = _linear_taps(x.shape[0], new_h)
  x0, x1, fx = _linear_taps(x.shape[1], new_w)
  extra = (1,) * (x.ndim - 2)
  fy = fy.reshape((-1, 1) + extra)
  fx = fx.reshape((1, -1) + extra)
  rows = x[y0] * (1 - fy) + x[y1] * fy
  return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def _fixed_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """OpenCV's INTER_LINEAR taps for 8-bit images: the offset in float32, weights rounded
  each on its own to 11-bit fixed point (``INTER_RESIZE_COEF_SCALE = 2048``)."""
  f = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
  i0 = np.floor(f).astype(np.int64)
  f = (f - i0).astype(np.float32)
  low, high = i0 < 0, i0 >= n_in - 1
  f[low | high] = 0
  i0 = np.clip(i0, 0, n_in - 1)
  w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
  w1 = np.rint(f * np.float32(2048)).astype(np.int32)
  return i0, np.minimum(i0 + 1, n_in - 1), w0, w1


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 ``[H, W(, C)]`` -> ``size = (new_h, new_w)`` as ``cv2.resize(INTER_LINEAR)``:
  half-pixel centres, edge clamp, no antialias, in OpenCV's fixed-point arithmetic.

  Horizontal pass in int32 with 11-bit weights, vertical pass as OpenCV's SIMD kernel
  (``VResizeLinearVec_32s8u``: ``((s0 >> 4) * b0 >> 16) + ((s1 >> 4) * b1 >> 16)``, then
  ``(x + 2) >> 2``). Checked against opencv-python 4.10 and 5.1: identical except the last
  few pixels of a row that OpenCV's scalar tail loop rounds (+-1, under 0.1% of pixels).
  """
  new_h, new_w = size
  if new_h < 1 or new_w < 1:
    raise ValueError(f"resize to {size}: sizes must be positive")
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ValueError(f"resize_bilinear takes uint8 images, got {x.dtype}")
  y0, y1, b0, b1 = _fixed_taps(x.shape[0], new_h)
  x0, x1, a0, a1 = _fixed_taps(x.shape[1], new_w)
  extra = (1,) * (x.ndim - 2)
  a0, a1 = a0.reshape((1, -1) + extra), a1.reshape((1, -1) + extra)
  b0, b1 = b0.reshape((-1, 1) + extra), b1.reshape((-1, 1) + extra)
  x = x.astype(np.int32)
  rows = x[:, x0] * a0 + x[:, x1] * a1  # <= 255 * 2048: fits int32 (and int16 after >> 4)
  out = (((rows[y0] >> 4) * b0) >> 16) + (((rows[y1] >> 4) * b1) >> 16)
  return np.clip((out + 2) >> 2, 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """``cv2.resize(INTER_NEAREST)``: ``src = floor(dst * in / out)``, clipped to the last."""
  new_h, new_w = size
  h, w = label.shape[:2]
  rows = np.minimum(np.arange(new_h) * h // new_h, h - 1)
  cols = np.minimum(np.arange(new_w) * w // new_w, w - 1)
  return label[rows[:, None], cols[None, :]]


def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv's keep-ratio rule: ``f = min(long/long_side, short/short_side)``,
  ``(int(w*f+0.5), int(h*f+0.5))``; returns ``(new_w, new_h)``."""
  f = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(w * f + 0.5), int(h * f + 0.5)


# --- OpenCV's uint8 BGR <-> HSV (H in [0, 180)) ----------------------------------------------

_HSV_SHIFT = 12
_I = np.arange(256, dtype=np.float64)
with np.errstate(divide="ignore"):
  # OpenCV's tables: saturate_cast<int> of a double rounds to nearest (even on ties).
  _SDIV = np.where(_I > 0, np.rint((255 << _HSV_SHIFT) / _I), 0).astype(np.int64)
  _HDIV = np.where(_I > 0, np.rint((180 << _HSV_SHIFT) / (6 * _I)), 0).astype(np.int64)


def rgb_to_hsv_cv(image: np.ndarray) -> np.ndarray:
  """OpenCV's ``COLOR_BGR2HSV`` on uint8 (integer path), fed the channels of an RGB image
  in the right roles. Returns uint8 ``[..., 3]`` = (H in [0, 180], S, V)."""
  r, g, b = (image[..., c].astype(np.int64) for c in range(3))
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  half = 1 << (_HSV_SHIFT - 1)
  s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
  h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = (h * _HDIV[diff] + half) >> _HSV_SHIFT  # arithmetic shift: floor, as in C on ints
  h = np.where(h < 0, h + 180, h)
  return np.stack([h, s, v], axis=-1).clip(0, 255).astype(np.uint8)


# OpenCV's sector table gives (b, g, r) as indices into (v, p, q, t).
_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def hsv_cv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  """OpenCV's ``COLOR_HSV2BGR`` on uint8, returned in RGB order: float32 arithmetic, and
  the result truncated, as OpenCV's SIMD kernel does for all but a row's last few pixels
  (its scalar tail rounds to nearest instead). Checked against opencv-python 4.10 and 5.1:
  99.99% of pixels identical, the rest +-1 (float evaluation order)."""
  h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180.0)
  s = hsv[..., 1].astype(np.float32) * np.float32(1.0 / 255.0)
  v = hsv[..., 2].astype(np.float32) * np.float32(1.0 / 255.0)
  h = np.where(h < 0, h + 6, h)
  h = np.where(h >= 6, h - 6, h).astype(np.float32)
  sector = np.floor(h).astype(np.int64)
  f = (h - sector).astype(np.float32)
  bad = (sector < 0) | (sector >= 6)
  sector = np.where(bad, 0, sector)
  f = np.where(bad, np.float32(0), f)
  one = np.float32(1)
  tab = np.stack([v, v * (one - s), v * (one - s * f), v * (one - s * (one - f))], axis=-1)
  idx = _SECTORS[sector]  # [..., 3] -> (b, g, r)
  bgr = np.take_along_axis(tab, idx, axis=-1)
  grey = (s == 0)[..., None]  # OpenCV's special case: b = g = r = v
  bgr = np.where(grey, v[..., None], bgr)
  out = np.clip(np.floor(bgr.astype(np.float32) * np.float32(255)), 0, 255).astype(np.uint8)
  return out[..., ::-1]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """mmseg's ``PhotoMetricDistortion.convert``: float32 affine, clip, truncate to uint8."""
  return np.clip(x.astype(np.float32) * np.float32(alpha) + np.float32(beta), 0,
                 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator,
                           brightness_delta: int = 32, contrast: tuple[float, float] = (0.5, 1.5),
                           saturation: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
  """mmseg's ``PhotoMetricDistortion`` on an RGB uint8 image (same draws and order)."""
  def do_contrast(img):
    if rng.integers(2):
      return _convert(img, alpha=rng.uniform(*contrast))
    return img

  img = image
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))
  mode = rng.integers(2)
  if mode == 1:
    img = do_contrast(img)
  if rng.integers(2):
    hsv = rgb_to_hsv_cv(img)
    hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*saturation))
    img = hsv_cv_to_rgb(hsv)
  if rng.integers(2):
    hsv = rgb_to_hsv_cv(img)
    # numpy's randint(-18, 18): upper bound exclusive, so -18..17.
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180
    img = hsv_cv_to_rgb(hsv)
  if mode == 0:
    img = do_contrast(img)
  return img


# --- the train and test transforms -----------------------------------------------------------


def _as_arrays(image: Image.Image | np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  img = np.asarray(image, np.uint8)
  lab = np.asarray(label, np.uint8)
  if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != lab.shape:
    raise ValueError(f"image {img.shape} and label {lab.shape} do not match ([H, W, 3] and [H, W])")
  return img, lab


def _crop_box(h: int, w: int, crop: tuple[int, int], rng: np.random.Generator):
  off_h = rng.integers(0, max(h - crop[0], 0) + 1)
  off_w = rng.integers(0, max(w - crop[1], 0) + 1)
  return slice(off_h, off_h + crop[0]), slice(off_w, off_w + crop[1])


@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
  """mmseg's train pipeline, steps 2-5 and 7: random-ratio keep-ratio resize, RandomCrop
  with ``cat_max_ratio``, horizontal flip, PhotoMetricDistortion, pad to ``crop``
  (image 0, label 255). ``crop`` and ``img_scale`` are (h, w) and (long, short)."""

  crop: tuple[int, int]
  img_scale: tuple[int, int]
  ratio_range: tuple[float, float] | None = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip: float = 0.5
  photometric: bool = True

  def __call__(self, image: Image.Image | np.ndarray, label: np.ndarray,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    img, lab = _as_arrays(image, label)
    h, w = lab.shape
    # Resize: r ~ U(ratio_range), target (int(long r), int(short r)), keep ratio.
    if self.ratio_range is None:
      scale = tuple(self.img_scale)
    else:
      lo, hi = self.ratio_range
      r = rng.random() * (hi - lo) + lo
      scale = (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
    new_w, new_h = rescale_size(w, h, scale)
    img = resize_bilinear(img, (new_h, new_w))
    lab = resize_nearest(lab, (new_h, new_w))
    # RandomCrop: up to 10 checked boxes, then the 11th is taken unchecked.
    box = _crop_box(new_h, new_w, self.crop, rng)
    if self.cat_max_ratio < 1.0:
      for _ in range(10):
        counts = np.bincount(lab[box].ravel(), minlength=256)  # np.unique's counts, O(n)
        counts[IGNORE] = 0
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
          break
        box = _crop_box(new_h, new_w, self.crop, rng)
    img, lab = img[box], lab[box]
    if rng.random() < self.flip:
      img, lab = img[:, ::-1], lab[:, ::-1]
    if self.photometric:
      img = photometric_distortion(img, rng)
    valid = lab.shape
    out = self.blank()
    out["image"][:valid[0], :valid[1]] = img
    out["label"][:valid[0], :valid[1]] = lab
    out["size"][:] = valid
    return out

  def blank(self) -> dict[str, np.ndarray]:
    """The empty example (zero image, all-ignore label, size 0) with the same keys."""
    ch, cw = self.crop
    return dict(image=np.zeros((ch, cw, 3), np.uint8), label=np.full((ch, cw), IGNORE, np.uint8),
                size=np.zeros(2, np.int32))


@dataclasses.dataclass(frozen=True)
class SegTestTransform:
  """mmseg's test pipeline: keep-ratio resize to ``img_scale * ratio`` then each side up to a
  multiple of ``size_divisor`` (bilinear), placed top-left in a zero ``canvas`` (h, w); the
  original label top-left in a 255 ``label_canvas`` (predictions are compared at the
  original size). A test size larger than the canvas is shrunk (keep ratio, multiples of
  ``size_divisor``) to fit, and flagged ``fitted``."""

  img_scale: tuple[int, int]
  size_divisor: int = 32
  canvas: tuple[int, int] = (512, 2048)
  label_canvas: tuple[int, int] = (2048, 2048)
  ratio: float = 1.0

  def test_size(self, h: int, w: int) -> tuple[tuple[int, int], tuple[int, int], bool]:
    """``((keep-ratio h, w), (final h, w), fitted)`` for an ``h x w`` image."""
    d = self.size_divisor
    scale = (int(self.img_scale[0] * self.ratio), int(self.img_scale[1] * self.ratio))
    kw, kh = rescale_size(w, h, scale)
    th, tw = -(-kh // d) * d, -(-kw // d) * d
    ch, cw = self.canvas
    if th <= ch and tw <= cw:
      return (kh, kw), (th, tw), False
    if ch < d or cw < d:
      raise DataError(f"config.eval canvas {self.canvas} is smaller than size_divisor {d}")
    f = min(ch / th, cw / tw)
    return (kh, kw), (max(d, int(th * f) // d * d), max(d, int(tw * f) // d * d)), True

  def __call__(self, image: Image.Image | np.ndarray, label: np.ndarray,
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    del rng  # deterministic
    img, lab = _as_arrays(image, label)
    h, w = lab.shape
    lh, lw = self.label_canvas
    if h > lh or w > lw:
      raise DataError(f"an image of {h}x{w} (h x w) does not fit config.eval.label_canvas "
                      f"{self.label_canvas}; raise it")
    (kh, kw), (th, tw), fitted = self.test_size(h, w)
    if fitted:  # one resize straight from the original, to lose less
      img = resize_bilinear(img, (th, tw))
    else:  # mmseg: Resize, then ResizeToMultiple (an identity when already a multiple)
      img = resize_bilinear(resize_bilinear(img, (kh, kw)), (th, tw))
    out = self.blank()
    out["image"][:th, :tw] = img
    out["size"][:] = (th, tw)
    out["label"][:h, :w] = lab
    out["label_size"][:] = (h, w)
    out["fitted"] = np.bool_(fitted)
    return out

  def blank(self) -> dict[str, np.ndarray]:
    """The empty example (zero image, all-ignore label, sizes 0) with the same keys."""
    ch, cw = self.canvas
    lh, lw = self.label_canvas
    return dict(image=np.zeros((ch, cw, 3), np.uint8), size=np.zeros(2, np.int32),
                label=np.full((lh, lw), IGNORE, np.uint8), label_size=np.zeros(2, np.int32),
                fitted=np.bool_(False))
