"""Test-time inference of a segmentor on fixed-size canvases (spec ``segmentation.md``
section 5): whole-image or sliding-window logits, flip and multi-scale averaging, and
the predicted labels at each image's original size -- all with static shapes, so one
compiled program serves a data set of varying image sizes.

Each test image sits at the top-left of a canvas (zero after normalisation beyond its
``size``); labels are predicted on a label canvas at the original image size. Resizes
whose sizes differ per image use PyTorch's bilinear rule (half-pixel centres, edge
clamp, no antialias) with per-image sizes, so the valid region is resized exactly as
the original resizes the unpadded image. What the canvas does change: whole-image
inference of an image smaller than its canvas sees the zero padding through the
backbone's receptive field (the original runs each image at its own size); sliding
windows never do while the image is at least one window in each direction.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.segmentation.segmentor import IGNORE_INDEX, Segmentor

MODES = ("whole", "slide")


def bilinear_taps(in_size: jax.Array, out_size: jax.Array, out_canvas: int, dtype=jnp.float32):
  """The two source indices and the weight of the second, for each of ``out_canvas``
  output positions of PyTorch's bilinear resize (``align_corners=False``) of an axis
  of ``in_size`` valid entries to ``out_size`` (traced scalars)."""
  out = jnp.arange(out_canvas, dtype=dtype)
  scale = in_size.astype(dtype) / out_size.astype(dtype)
  source = jnp.maximum((out + 0.5) * scale - 0.5, 0.0)
  first = jnp.minimum(jnp.floor(source).astype(jnp.int32), in_size - 1)
  return first, jnp.minimum(first + 1, in_size - 1), source - first


def _lerp(x: jax.Array, taps, axis: int) -> jax.Array:
  first, second, weight = taps
  shape = [1] * x.ndim
  shape[axis] = -1
  weight = weight.astype(x.dtype).reshape(shape)
  return (jnp.take(x, first, axis=axis) * (1 - weight)
          + jnp.take(x, second, axis=axis) * weight)


def resize_region(x: jax.Array, size: jax.Array, out_size: jax.Array,
                  out_canvas: Sequence[int]) -> jax.Array:
  """Bilinear resize of the top-left ``size`` (h, w) region of one ``[H, W, C]`` canvas
  to ``out_size`` at the top-left of an ``out_canvas`` canvas (rest: edge values)."""
  rows = bilinear_taps(size[0], out_size[0], out_canvas[0], x.dtype)
  cols = bilinear_taps(size[1], out_size[1], out_canvas[1], x.dtype)
  return _lerp(_lerp(x, rows, 0), cols, 1)


def flip_region(x: jax.Array, widths: jax.Array) -> jax.Array:
  """Mirrors each ``[B, H, W, ...]`` image within its first ``widths[b]`` columns."""
  columns = jnp.arange(x.shape[2])
  index = jnp.clip(widths[:, None] - 1 - columns[None, :], 0, x.shape[2] - 1)
  return jnp.take_along_axis(x, index.reshape(*index.shape[:1], 1, -1,
                                              *(1,) * (x.ndim - 3)), axis=2)


def _ceil_quarter(size: jax.Array) -> jax.Array:
  # The stem's two stride-2 convolutions map a length n to ceil(ceil(n / 2) / 2).
  return (size + 3) // 4


def whole_logits(seg: Segmentor, x: jax.Array, size: jax.Array) -> jax.Array:
  """Whole-image logits ``[B, H, W, K]`` at each image's test size (on its canvas): the
  decode map of the valid region (stride 4) resized to ``size`` as the original does."""
  decoded = seg.decode_head(seg.backbone.forward_features(x))
  canvas = x.shape[1:3]
  return jax.vmap(lambda d, s: resize_region(d, _ceil_quarter(s), s, canvas))(decoded, size)


def _grids(length: jax.Array, crop: int, stride: int) -> jax.Array:
  """mmseg's window count along an axis of ``length`` (per image)."""
  return jnp.maximum(length - crop + stride - 1, 0) // stride + 1


def slide_logits(seg: Segmentor, x: jax.Array, size: jax.Array, crop: Sequence[int],
                 stride: Sequence[int]) -> jax.Array:
  """mmseg's sliding-window logits ``[B, H, W, K]``: windows of ``crop`` every
  ``stride`` (the last one flush with the image edge), each inferred whole, summed
  and divided by the number of windows covering each pixel."""
  (crop_h, crop_w), (stride_h, stride_w) = crop, stride
  batch, height, width, _ = x.shape
  if crop_h > height or crop_w > width:
    raise ValueError(f"slide: the window {tuple(crop)} exceeds the canvas {(height, width)}")
  # The canvas's window counts (static): each image uses those its own size needs.
  rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
  cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
  graphdef, state = nnx.split(seg)

  def window(index):
    i, j = index // cols, index % cols
    y2 = jnp.minimum(i * stride_h + crop_h, size[:, 0])
    x2 = jnp.minimum(j * stride_w + crop_w, size[:, 1])
    y1, x1 = jnp.maximum(y2 - crop_h, 0), jnp.maximum(x2 - crop_w, 0)
    used = (i < _grids(size[:, 0], crop_h, stride_h)) & (j < _grids(size[:, 1], crop_w, stride_w))
    patches = jax.vmap(lambda image, a, b: jax.lax.dynamic_slice(
        image, (a, b, 0), (crop_h, crop_w, image.shape[-1])))(x, y1, x1)
    logits = nnx.merge(graphdef, state, copy=True)(patches)  # Variables of this trace
    return logits * used[:, None, None, None].astype(logits.dtype), y1, x1, used

  logits, y1, x1, used = jax.lax.map(window, jnp.arange(rows * cols))
  classes = logits.shape[-1]

  def paste(canvas, args):
    patch, a, b = args
    return jax.vmap(lambda c, p, a, b: jax.lax.dynamic_update_slice(
        c, jax.lax.dynamic_slice(c, (a, b, 0), p.shape) + p, (a, b, 0)))(canvas, patch, a, b), None

  total, _ = jax.lax.scan(paste, jnp.zeros((batch, height, width, classes), logits.dtype),
                          (logits, y1, x1))
  ones = used[..., None, None, None].astype(logits.dtype) * jnp.ones((1, 1, crop_h, crop_w, 1),
                                                                     logits.dtype)
  count, _ = jax.lax.scan(paste, jnp.zeros((batch, height, width, 1), logits.dtype), (ones, y1, x1))
  return total / jnp.maximum(count, 1)


def scale_logits(seg: Segmentor, x: jax.Array, size: jax.Array, *, mode: str = "whole",
                crop: Sequence[int] = (512, 512), stride: Sequence[int] = (341, 341),
                flip: bool = False) -> list[jax.Array]:
  """The logits of one test scale at its test size: ``[logits]``, or
  ``[logits, unflipped logits of the mirrored images]`` with ``flip``."""
  if mode not in MODES:
    raise ValueError(f"segmentation inference mode must be one of {MODES}, got {mode!r}")

  def infer(images):
    if mode == "whole":
      return whole_logits(seg, images, size)
    return slide_logits(seg, images, size, crop, stride)

  out = [infer(x)]
  if flip:
    out.append(flip_region(infer(flip_region(x, size[:, 1])), size[:, 1]))
  return out


def predict_labels(variants: Sequence[tuple[jax.Array, jax.Array]], label_size: jax.Array,
                   label_canvas: Sequence[int], rows_per_chunk: int = 64) -> jax.Array:
  """Labels ``[B, *label_canvas]`` (int32) at each image's original size from test-size
  logits ``(logits [B, H, W, K], size [B, 2])`` of one or more variants (scales, flips):
  each resized to the original size, softmax, averaged, argmax -- mmseg's test-time
  augmentation (one variant: the argmax of its resized logits). Computed in chunks of
  output rows, so the original-size logits are never all in memory."""
  height, width = label_canvas
  chunks = -(-height // rows_per_chunk)

  def one_image(logits, sizes, out_size):
    def chunk(c):
      rows = c * rows_per_chunk + jnp.arange(rows_per_chunk)
      total = 0.0
      for x, size in zip(logits, sizes):
        first, second, weight = bilinear_taps(size[0], out_size[0], chunks * rows_per_chunk,
                                              x.dtype)
        taps = (first[rows], second[rows], weight[rows])
        part = _lerp(_lerp(x, taps, 0),
                     bilinear_taps(size[1], out_size[1], width, x.dtype), 1)
        total = total + (jax.nn.softmax(part, axis=-1) if len(logits) > 1 else part)
      return jnp.argmax(total, axis=-1).astype(jnp.int32)

    return jax.lax.map(chunk, jnp.arange(chunks)).reshape(-1, width)[:height]

  logits = [v[0] for v in variants]
  sizes = [v[1] for v in variants]
  return jax.vmap(one_image)(logits, sizes, label_size)


def confusion_counts(pred: jax.Array, labels: jax.Array, num_classes: int,
                     valid: jax.Array | None = None) -> dict[str, jax.Array]:
  """mmseg's ``intersect_and_union`` summed over a batch: per-class ``intersect``,
  ``union``, ``pred_area`` and ``label_area`` (int32 ``[K]``) over pixels whose label is
  not ``IGNORE_INDEX`` (and, with ``valid [B]``, of valid images); labels outside
  ``[0, K)`` count nowhere, as ``torch.histc`` drops them."""
  keep = labels != IGNORE_INDEX
  if valid is not None:
    keep &= valid.reshape(-1, *(1,) * (labels.ndim - 1))
  labels = labels.astype(jnp.int32)

  def area(values, mask):
    return jnp.bincount(jnp.where(mask, values, num_classes).ravel(),
                        length=num_classes + 1)[:num_classes].astype(jnp.int32)

  intersect = area(labels, keep & (pred == labels))
  pred_area, label_area = area(pred, keep), area(labels, keep)
  return {"intersect": intersect, "union": pred_area + label_area - intersect,
          "pred_area": pred_area, "label_area": label_area}
