"""RoI pooling operators with ``torchvision.ops`` semantics, and deformable RoI pooling.

Layout is torchvision's: input ``[N, C, H, W]``; boxes ``[K, 5]`` with rows
``(batch_index, x1, y1, x2, y2)`` in input-image coordinates (multiplied by
``spatial_scale`` to reach feature coordinates), or a list of per-image ``[L, 4]``
arrays. Everything is jit / vmap / grad-able with static shapes.

Two evaluation strategies, both exact:

* A fixed sampling grid (``sampling_ratio > 0``) gathers the four bilinear corners of
  every sampling point, as torchvision does: ``K * ph * pw * ratio**2`` points.
* Everything whose extent depends on the box (the adaptive grid
  ``ceil(roi_size / pooled_size)`` of ``sampling_ratio <= 0``, and the quantised
  bins of the RoI pools) cannot have a data-dependent number of samples under jit.
  These use that bilinear weights and box masks are separable: the sum over a
  ``gy x gx`` grid of bilinear samples in a bin is ``wy^T X wx`` with per-axis weight
  vectors ``wy [H]``, ``wx [W]`` that collect every sampling point's weight on each
  row / column. With ``ceil(bin)`` points per bin consecutive points are more than
  half a pixel apart, so at most four of them touch any row and ``wy`` has a closed
  form with a fixed number of terms, whatever the box size. The cost is a
  contraction with the whole feature map, ``O(K * ph * C * H * W)`` per call
  (``O(K * ph * pw * C * H * W)`` with per-bin offsets): independent of the boxes,
  but prefer ``sampling_ratio > 0`` on large feature maps. RoIs are processed in
  chunks (``lax.map``) so the per-RoI copies of the feature map stay small.

Gradients are those of the forward function (autodiff), with respect to the input,
and also the boxes' coordinates and the offsets of :func:`deform_roi_pool`; the
input gradients equal torchvision's backward kernels. The one exception is
:func:`ps_roi_pool`, whose torchvision forward and backward disagree at the image
border; both are reproduced (see there).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dcnv3.params import pair
from pallas_kernels.dcnv3.reference import compute_dtype

# Elements of per-RoI work (per-RoI feature-map copies and their products) per chunk.
_CHUNK_ELEMENTS = 1 << 23
# The adaptive grid's point count per axis, kept where int32 and float32 are exact.
_MAX_GRID = 1 << 22
# Candidate sampling points per row in the closed-form adaptive weights: at most four
# points lie within one pixel of a row; one more on each side absorbs rounding.
_CANDIDATES = 6


LAYOUTS = ("NCHW", "NHWC")


def _nchw(op: str, input: jax.Array, layout: str) -> jax.Array:  # noqa: A002
  """The input as NCHW: ``layout="NHWC"`` (channels-last, as the InternImage models
  produce features) is transposed once; the pooled output is transposed back."""
  if layout not in LAYOUTS:
    raise ValueError(f"{op}: layout must be 'NCHW' or 'NHWC', got {layout!r}")
  input = jnp.asarray(input)
  return jnp.moveaxis(input, -1, 1) if layout == "NHWC" and input.ndim == 4 else input


def _from_nchw(output: jax.Array, layout: str) -> jax.Array:
  return jnp.moveaxis(output, 1, -1) if layout == "NHWC" else output


def _boxes_array(op: str, boxes, input: jax.Array) -> jax.Array:  # noqa: A002
  """``[K, 5]`` boxes from either of torchvision's forms (outside jit: a list's length
  is static). Concrete boxes (not traced) are checked: a batch index outside
  ``[0, N)`` or a non-finite number is an error that names the box; traced ones are
  handled in the pooling (the box gives zeros)."""
  if isinstance(boxes, (list, tuple)):
    # torchvision's other form: one [L_i, 4] array per image.
    parts = []
    for i, b in enumerate(boxes):
      b = jnp.asarray(b)
      if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{op}: boxes[{i}] must be [L, 4] (x1, y1, x2, y2), got shape "
                         f"{tuple(b.shape)}")
      parts.append(jnp.concatenate([jnp.full((b.shape[0], 1), i, b.dtype), b], 1))
    boxes = jnp.concatenate(parts, 0) if parts else jnp.zeros((0, 5), jnp.float32)
  boxes = jnp.asarray(boxes)
  if boxes.ndim != 2 or boxes.shape[1] != 5:
    raise ValueError(f"{op}: boxes must be [K, 5] (batch_index, x1, y1, x2, y2) or a list of "
                     f"[L, 4] arrays, got shape {tuple(boxes.shape)}")
  if not isinstance(boxes, jax.core.Tracer) and input.ndim == 4:
    images = input.shape[0]
    values = np.asarray(boxes, np.float64)
    finite = np.isfinite(values).all(axis=1)
    index = np.trunc(np.where(finite, values[:, 0], 0))  # torchvision casts to int
    bad = np.flatnonzero(~finite | (index < 0) | (index >= images))
    if bad.size:
      k = int(bad[0])
      why = ("has a non-finite number" if not finite[k] else
             f"has batch index {int(index[k])}, outside [0, {images})")
      raise ValueError(f"{op}: box {k} {why} ({bad.size} bad box(es) of {len(values)}); "
                       "under jit such boxes give zeros")
  return boxes


def _output_size(op: str, output_size) -> tuple[int, int]:
  ph, pw = pair(output_size, "output_size")
  if ph < 1 or pw < 1:
    raise ValueError(f"{op}: output_size must be positive, got {output_size!r}")
  return ph, pw


def _input_and_boxes(op: str, input: jax.Array, boxes: jax.Array,  # noqa: A002
                     channels_divisor: int = 1):
  """Checks ``input``; the compute dtype, the boxes' batch indices and coordinates, and
  which boxes are valid. An invalid box (batch index outside ``[0, N)``, a non-finite
  number) reads image 0 at the origin instead, and :func:`_zero_invalid` zeroes its
  output: no other image's values, no NaN in any gradient."""
  if input.ndim != 4:
    raise ValueError(f"{op}: input must be rank 4 [N, C, H, W], got shape {tuple(input.shape)}")
  if not jnp.issubdtype(input.dtype, jnp.floating):
    raise TypeError(f"{op}: input must be floating point, got {input.dtype}")
  if input.shape[1] % channels_divisor:
    raise ValueError(f"{op}: input channels ({input.shape[1]}) must be divisible by "
                     f"output_size[0] * output_size[1] ({channels_divisor})")
  cdt = compute_dtype(input.dtype)
  boxes = boxes.astype(cdt)  # float32 coordinates even for bfloat16 features
  index = jax.lax.stop_gradient(boxes[:, 0])
  valid = jnp.all(jnp.isfinite(boxes), axis=1)
  index = jnp.trunc(jnp.where(valid, index, 0))
  valid &= (index >= 0) & (index < input.shape[0])
  batch = jnp.where(valid, index, 0).astype(jnp.int32)
  xyxy = jnp.where(valid[:, None], boxes[:, 1:], 0)
  return cdt, batch, xyxy, valid


def _zero_invalid(out: jax.Array, valid: jax.Array) -> jax.Array:
  return jnp.where(valid[:, None, None, None], out, jnp.zeros((), out.dtype))


def _map_rois(fn: Callable[..., jax.Array], input: jax.Array, batch: jax.Array,  # noqa: A002
              arrays: Sequence[jax.Array], work_per_roi: int) -> jax.Array:
  """``fn(input[batch[k]], *(a[k] for a in arrays))`` for every RoI, stacked.

  One vmap when the whole batch of RoIs is small, else chunks of RoIs in a
  ``lax.map`` so that only ``chunk`` copies of the feature map exist at a time.
  """
  if input.shape[0] == 1:
    # One image (a detector pools per image): every RoI reads the same map, unbatched
    # under vmap, so there is no per-RoI copy of it, nor, in the backward pass, a
    # scatter-add of those copies (which made the gradient ~30x the forward pass).
    per_roi = lambda b, *a: fn(input[0], *a)
  else:
    per_roi = lambda b, *a: fn(input[b], *a)
  chunk = max(1, _CHUNK_ELEMENTS // max(work_per_roi, 1))
  if chunk >= batch.shape[0]:
    return jax.vmap(per_roi)(batch, *arrays)
  return jax.lax.map(lambda args: per_roi(*args), (batch, *arrays), batch_size=chunk)


def _c_round(v: jax.Array) -> jax.Array:
  """C's ``round``: halves away from zero (``jnp.round`` rounds them to even)."""
  return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


# -- bilinear sampling (RoIAlign's rule) -------------------------------------------------


def _axis_corners(p: jax.Array, size: int):
  """RoIAlign's bilinear rule along one axis: corner indices and weights.

  A point is sampled when ``-1 <= p <= size``; it is then clamped into
  ``[0, size - 1]`` and split between ``floor`` and ``floor + 1`` (the last row
  takes all of a point at or past it).
  """
  valid = (p >= -1) & (p <= size)
  q = jnp.clip(p, 0, size - 1)
  lo = jnp.floor(q)
  frac = q - lo
  lo = lo.astype(jnp.int32)
  hi = jnp.minimum(lo + 1, size - 1)
  zero = jnp.zeros_like(frac)
  return lo, hi, jnp.where(valid, 1 - frac, zero), jnp.where(valid, frac, zero)


def _grid_pool(input: jax.Array, batch: jax.Array, y: jax.Array, x: jax.Array,  # noqa: A002
               count: jax.Array, position_sensitive: bool, cdt) -> jax.Array:
  """Average of bilinear samples on a static grid per bin: ``[K, C_out, ph, pw]``.

  ``y`` is ``[K, ph, pw|1, gy]`` and ``x`` is ``[K, ph|1, pw, gx]`` (sample positions
  in feature coordinates); ``count`` ``[K]`` divides the sum.
  """
  n, c, h, w = input.shape
  k, ph = y.shape[:2]
  pw = x.shape[2]
  y = jnp.broadcast_to(y, (k, ph, pw, y.shape[-1]))
  x = jnp.broadcast_to(x, (k, ph, pw, x.shape[-1]))
  if position_sensitive:
    # Channel c_out * ph * pw + bin: rows of (n, y, x, bin), each of C_out channels.
    bins = ph * pw
    table = input.reshape(n, c // bins, bins, h, w).transpose(0, 3, 4, 2, 1)
    table = table.reshape(n * h * w * bins, c // bins)
    bin_index = jnp.arange(bins, dtype=jnp.int32).reshape(1, ph, pw, 1, 1, 1, 1)
  else:
    bins = 1
    table = input.transpose(0, 2, 3, 1).reshape(n * h * w, c)
    bin_index = 0
  # Both corners of each axis, [K, ph, pw, g, 2]; then every (point, corner) pair of
  # the bin in one gather: [K, ph, pw, gy * 2 * gx * 2] rows and weights.
  ylo, yhi, wylo, wyhi = _axis_corners(y, h)
  xlo, xhi, wxlo, wxhi = _axis_corners(x, w)
  yi, wy = jnp.stack([ylo, yhi], -1), jnp.stack([wylo, wyhi], -1)
  xi, wx = jnp.stack([xlo, xhi], -1), jnp.stack([wxlo, wxhi], -1)
  b = batch.reshape(k, 1, 1, 1, 1, 1, 1)
  row = ((b * h + yi[..., :, :, None, None]) * w + xi[..., None, None, :, :]) * bins
  row = (row + bin_index).reshape(k, ph, pw, -1)
  weight = (wy[..., :, :, None, None] * wx[..., None, None, :, :]).reshape(k, ph, pw, -1)
  total = jnp.sum(table[row].astype(cdt) * weight[..., None], axis=-2)
  total = total / count.astype(cdt)[:, None, None, None]
  return total.transpose(0, 3, 1, 2)


def _adaptive_axis_weights(start: jax.Array, step: jax.Array, grid: jax.Array,
                           size: int) -> jax.Array:
  """Per-row weight of an adaptive sampling grid along one axis: ``start.shape + [size]``.

  Points ``start + (t + 0.5) * step`` for ``t < grid`` (``step`` and ``grid`` broadcast
  against ``start``), each spread over rows by RoIAlign's bilinear rule. A point
  touches row ``r`` only if it lies in ``[r - 1, r + 1]``, and consecutive points are
  more than half a pixel apart, so a few candidates per row cover every point.
  """
  r = jnp.arange(size, dtype=start.dtype)
  start, step, grid = start[..., None], step[..., None], grid[..., None]
  safe_step = jnp.where(step > 0, step, 1)
  first = jax.lax.stop_gradient((r - 1 - start) / safe_step - 0.5)
  first = jnp.clip(first, -2, _MAX_GRID + 2)  # finite and int32-safe for any box
  t0 = jnp.maximum(jnp.ceil(first).astype(jnp.int32) - 1, 0)
  total = jnp.zeros(jnp.broadcast_shapes(start.shape, r.shape), start.dtype)
  for m in range(_CANDIDATES):
    t = t0 + m
    p = start + (t.astype(start.dtype) + 0.5) * step
    ok = (t < grid) & (p >= -1) & (p <= size)
    weight = jnp.maximum(1 - jnp.abs(jnp.clip(p, 0, size - 1) - r), 0)
    total = total + jnp.where(ok, weight, 0)
  return total


def _dense_pool(input: jax.Array, batch: jax.Array, wy: jax.Array, wx: jax.Array,  # noqa: A002
                position_sensitive: bool, cdt) -> jax.Array:
  """``sum_{h, w} wy[k, i, j, h] * X[b_k, c(i, j), h, w] * wx[k, i, j, w]``.

  ``wy`` is ``[K, ph, pw|1, H]`` and ``wx`` ``[K, ph|1, pw, W]``; when neither depends
  on the other bin axis the contraction is the cheaper ``wy X wx^T``.
  """
  _, c, h, w = input.shape
  ph, pw = wy.shape[1], wx.shape[2]
  separable = wy.shape[2] == 1 and wx.shape[1] == 1
  precision = jax.lax.Precision.HIGHEST  # these are averages, not a matmul layer

  def one(image, wy_k, wx_k):
    image = image.astype(cdt)
    if position_sensitive:
      image = image.reshape(c // (ph * pw), ph, pw, h, w)
      if separable:
        return jnp.einsum("ih,cijhw,jw->cij", wy_k[:, 0], image, wx_k[0], precision=precision)
      return jnp.einsum("ijh,cijhw,ijw->cij", wy_k, image, wx_k, precision=precision)
    if separable:
      return jnp.einsum("ih,chw,jw->cij", wy_k[:, 0], image, wx_k[0], precision=precision)
    return jnp.einsum("ijh,chw,ijw->cij", wy_k, image, wx_k, precision=precision)

  work = c * h * w * (1 if separable or position_sensitive else ph)
  return _map_rois(one, input, batch, (wy, wx), 2 * work)


@functools.partial(jax.jit, static_argnames=(
    "op", "output_size", "spatial_scale", "sampling_ratio", "offset_px", "min_size",
    "position_sensitive", "gamma"))
def _aligned_pool(op: str, input: jax.Array, boxes: jax.Array,  # noqa: A002
                  offset: jax.Array | None, *, output_size: tuple[int, int],
                  spatial_scale: float, sampling_ratio: int, offset_px: float, min_size: bool,
                  position_sensitive: bool,
                  gamma: float = 0.0) -> jax.Array:
  """RoIAlign-style average pooling shared by roi_align, ps_roi_align, deform_roi_pool.

  ``offset`` ``[K, 2, ph, pw]`` (or None) moves bin ``(i, j)``'s start by ``gamma *
  offset * (roi_width, roi_height)`` (deformable RoI pooling).
  """
  ph, pw = output_size
  cdt, batch, xyxy, valid = _input_and_boxes(op, input, boxes,
                                             ph * pw if position_sensitive else 1)
  n, c, h, w = input.shape
  c_out = c // (ph * pw) if position_sensitive else c
  k = batch.shape[0]
  if k == 0:
    return jnp.zeros((0, c_out, ph, pw), input.dtype)
  xyxy = xyxy * spatial_scale - offset_px
  x1, y1, x2, y2 = (xyxy[:, i] for i in range(4))
  roi_w, roi_h = x2 - x1, y2 - y1
  if min_size:  # torchvision's legacy (aligned=False) RoIAlign: at least one pixel
    roi_w, roi_h = jnp.maximum(roi_w, 1), jnp.maximum(roi_h, 1)
  bin_w, bin_h = roi_w / pw, roi_h / ph
  # Start of each bin [K, ph, 1] / [K, 1, pw], or per bin [K, ph, pw] when shifted.
  y0 = (y1[:, None] + jnp.arange(ph, dtype=cdt) * bin_h[:, None])[:, :, None]
  x0 = (x1[:, None] + jnp.arange(pw, dtype=cdt) * bin_w[:, None])[:, None, :]
  if offset is not None:
    o = offset.astype(cdt) * gamma
    x0 = x0 + o[:, 0] * roi_w[:, None, None]
    y0 = y0 + o[:, 1] * roi_h[:, None, None]

  if sampling_ratio > 0:
    gy = gx = sampling_ratio
    t = (jnp.arange(sampling_ratio, dtype=cdt) + 0.5) / sampling_ratio
    ys = y0[..., None] + t * bin_h[:, None, None, None]
    xs = x0[..., None] + t * bin_w[:, None, None, None]
    count = jnp.full((k,), gy * gx, cdt)
    out = _grid_pool(input, batch, ys, xs, count, position_sensitive, cdt)
  else:
    # The adaptive grid ceil(roi / pooled) per RoI: a traced count, so closed-form
    # per-row weights (see the module docstring). Negative sizes give no points.
    grid = lambda size, bins: jnp.clip(jnp.ceil(jax.lax.stop_gradient(size) / bins),
                                       0, _MAX_GRID).astype(jnp.int32)
    gy, gx = grid(roi_h, ph), grid(roi_w, pw)
    step_y = bin_h / jnp.maximum(gy, 1).astype(cdt)
    step_x = bin_w / jnp.maximum(gx, 1).astype(cdt)
    # torchvision divides by max(gy * gx, 1); fold it into the row weights.
    count = jnp.maximum(gy * gx, 1).astype(cdt)
    wy = _adaptive_axis_weights(y0, step_y[:, None, None], gy[:, None, None], h)
    wy = wy / count[:, None, None, None]
    wx = _adaptive_axis_weights(x0, step_x[:, None, None], gx[:, None, None], w)
    out = _dense_pool(input, batch, wy, wx, position_sensitive, cdt)
  return _zero_invalid(out, valid).astype(input.dtype)


def roi_align(
    input: jax.Array,  # noqa: A002
    boxes,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """RoIAlign (torchvision): average of bilinear samples on a grid in each bin.

  Args:
    input: ``[N, C, H, W]`` (``[N, H, W, C]`` with ``layout="NHWC"``, which also
      gives the output channels-last, ``[K, ph, pw, C_out]``).
    boxes: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of ``[L, 4]``.
    output_size: ``(ph, pw)`` or an int.
    spatial_scale: maps box coordinates to feature coordinates.
    sampling_ratio: samples per bin and axis; ``<= 0`` for ``ceil(roi_size / pooled)``.
    aligned: shift boxes by -0.5 pixel (pixel centres); ``False`` is the legacy
      behaviour, which also forces boxes to at least 1x1.

  Returns:
    ``[K, C, ph, pw]`` in the input's dtype.
  """
  op = "roi_align"
  input = _nchw(op, input, layout)
  out = _aligned_pool(op, input, _boxes_array(op, boxes, input), None,
                      output_size=_output_size(op, output_size),
                      spatial_scale=float(spatial_scale), sampling_ratio=int(sampling_ratio),
                      offset_px=0.5 if aligned else 0.0, min_size=not aligned,
                      position_sensitive=False)
  return _from_nchw(out, layout)


def ps_roi_align(
    input: jax.Array,  # noqa: A002
    boxes,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """Position-sensitive RoIAlign (torchvision): bin ``(i, j)`` of output channel ``c``
  averages input channel ``c * ph * pw + i * pw + j``; boxes are pixel-centre aligned.

  Returns ``[K, C / (ph * pw), ph, pw]``. A box with no sampling points (zero size
  with an adaptive grid) gives zeros, where torchvision divides by zero.
  """
  op = "ps_roi_align"
  input = _nchw(op, input, layout)
  out = _aligned_pool(op, input, _boxes_array(op, boxes, input), None,
                      output_size=_output_size(op, output_size),
                      spatial_scale=float(spatial_scale), sampling_ratio=int(sampling_ratio),
                      offset_px=0.5, min_size=False, position_sensitive=True)
  return _from_nchw(out, layout)


def deform_roi_pool(
    input: jax.Array,  # noqa: A002
    boxes,
    offset: jax.Array | None,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    position_sensitive: bool = False,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """Deformable RoI pooling (Deformable ConvNets): RoIAlign with per-bin offsets.

  Pixel-centre aligned RoIAlign average pooling in which bin ``(i, j)`` of RoI ``k``
  is shifted by ``gamma * (offset[k, 0, i, j] * roi_width, offset[k, 1, i, j] *
  roi_height)`` (``x`` then ``y``). With ``position_sensitive`` each bin reads its own
  channel group as in :func:`ps_roi_align`.

  Args:
    input: ``[N, C, H, W]`` (``[N, H, W, C]`` with ``layout="NHWC"``, which also
      gives the output channels-last, ``[K, ph, pw, C_out]``).
    boxes: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, or a list of ``[L, 4]``.
    offset: ``[K, 2, ph, pw]`` normalised offsets, or None for none.
    output_size: ``(ph, pw)`` or an int.
    spatial_scale: maps box coordinates to feature coordinates.
    sampling_ratio: samples per bin and axis; ``<= 0`` for ``ceil(roi_size / pooled)``.
    gamma: scale of the offsets.
    position_sensitive: read channel group ``c * ph * pw + i * pw + j`` in bin ``(i, j)``.

  Returns:
    ``[K, C_out, ph, pw]``, ``C_out = C`` or ``C / (ph * pw)``. Empty boxes (no
    sampling points) give zeros, and gradients stay finite.
  """
  op = "deform_roi_pool"
  input = _nchw(op, input, layout)
  ph, pw = _output_size(op, output_size)
  boxes = _boxes_array(op, boxes, input)
  if offset is not None:
    offset = jnp.asarray(offset)
    k = boxes.shape[0]
    if offset.shape != (k, 2, ph, pw):
      raise ValueError(f"{op}: offset must have shape {(k, 2, ph, pw)} (K, 2, ph, pw), got "
                       f"{tuple(offset.shape)}")
  out = _aligned_pool(op, input, boxes, offset, output_size=(ph, pw),
                      spatial_scale=float(spatial_scale), sampling_ratio=int(sampling_ratio),
                      offset_px=0.5, min_size=False, position_sensitive=bool(position_sensitive),
                      gamma=float(gamma))
  return _from_nchw(out, layout)


# -- quantised RoI pools -------------------------------------------------------------------


def _quantised_bins(xyxy: jax.Array, spatial_scale: float, ph: int, pw: int, h: int, w: int,
                    *, plus_one: bool, cdt):
  """Integer bin bounds ``[K, ph]`` / ``[K, pw]`` of torchvision's RoI pools.

  Box corners are rounded to feature pixels; bins split the box in floating point
  (``floor`` of the start, ``ceil`` of the end, in the compute dtype as torchvision
  does in its own) and are clipped to the image.
  """
  corners = _c_round(jax.lax.stop_gradient(xyxy) * spatial_scale).astype(jnp.int32)
  x1, y1, x2, y2 = (corners[:, i] for i in range(4))
  extra = 1 if plus_one else 0
  roi_w = jnp.maximum(x2 - x1 + extra, 1).astype(cdt)
  roi_h = jnp.maximum(y2 - y1 + extra, 1).astype(cdt)

  def bounds(start, size, bins, limit):
    bin_size = size / bins
    i = jnp.arange(bins, dtype=cdt)
    lo = jnp.floor(i * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    hi = jnp.ceil((i + 1) * bin_size[:, None]).astype(jnp.int32) + start[:, None]
    return jnp.clip(lo, 0, limit), jnp.clip(hi, 0, limit)

  hs, he = bounds(y1, roi_h, ph, h)
  ws, we = bounds(x1, roi_w, pw, w)
  return hs, he, ws, we


def roi_pool(
    input: jax.Array,  # noqa: A002
    boxes,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """RoI max pooling (torchvision): maximum over quantised bins; empty bins give 0.

  The gradient goes to the first maximum of each bin in row-major order, as
  torchvision's argmax does.

  Returns:
    ``[K, C, ph, pw]`` in the input's dtype.
  """
  op = "roi_pool"
  input = _nchw(op, input, layout)
  out = _roi_pool(input, _boxes_array(op, boxes, input),
                  output_size=_output_size(op, output_size), spatial_scale=float(spatial_scale))
  return _from_nchw(out, layout)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale"))
def _roi_pool(input: jax.Array, boxes: jax.Array, *, output_size: tuple[int, int],  # noqa: A002
              spatial_scale: float) -> jax.Array:
  ph, pw = output_size
  cdt, batch, xyxy, valid = _input_and_boxes("roi_pool", input, boxes)
  n, c, h, w = input.shape
  k = batch.shape[0]
  if k == 0:
    return jnp.zeros((0, c, ph, pw), input.dtype)
  hs, he, ws, we = _quantised_bins(xyxy, spatial_scale, ph, pw, h, w, plus_one=True, cdt=cdt)
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_y = (rows >= hs[..., None]) & (rows < he[..., None])  # [K, ph, H]
  in_x = (cols >= ws[..., None]) & (cols < we[..., None])  # [K, pw, W]
  empty = (he <= hs)[:, :, None] | (we <= ws)[:, None, :]  # [K, ph, pw]

  def one(image, in_y_k, in_x_k, empty_k):
    # The max is separable: over each bin's columns first, then over its rows. The
    # first maximum in row-major order is in the first row holding the bin's
    # maximum, at that row's first maximum; argmax picks first occurrences.
    values = jax.lax.stop_gradient(image)
    masked = jnp.where(in_x_k[:, None, None, :], values[None], -jnp.inf)  # [pw, C, H, W]
    col_arg = jnp.argmax(masked, axis=-1)  # [pw, C, H]
    col_max = jnp.max(masked, axis=-1)
    masked = jnp.where(in_y_k[:, None, None, :], col_max[None], -jnp.inf)  # [ph, pw, C, H]
    h_arg = jnp.argmax(masked, axis=-1)  # [ph, pw, C]
    w_arg = jnp.take_along_axis(jnp.broadcast_to(col_arg[None], (ph,) + col_arg.shape),
                                h_arg[..., None], axis=-1)[..., 0]
    # The gradient reaches the input only through this gather, at the argmax.
    picked = image[jnp.arange(c)[None, None, :], h_arg, w_arg]  # [ph, pw, C]
    picked = jnp.where(empty_k[..., None], jnp.zeros((), image.dtype), picked)
    return picked.transpose(2, 0, 1)

  out = _map_rois(one, input, batch, (in_y, in_x, empty), 2 * pw * c * h * w)
  return _zero_invalid(out, valid).astype(input.dtype)


def _ps_roi_pool_linear(input: jax.Array, batch: jax.Array,  # noqa: A002
                        forward: tuple[jax.Array, jax.Array],
                        backward: tuple[jax.Array, jax.Array], cdt) -> jax.Array:
  """The pooling with one pair of bin weights, and its input gradient with another.

  torchvision's PSRoIPool forward clips bin ends to ``H - 1`` / ``W - 1`` (the last
  row and column are never read) while its backward kernel clips them to ``H`` /
  ``W``; both are reproduced (``../shared/golden``'s ``ps_roi_pool`` needs both).
  """

  # Everything is an explicit argument (nothing traced is closed over), so the rule
  # also holds under vmap; the bin weights come from quantised boxes: no gradient.
  @jax.custom_vjp
  def pool(x, b, fy, fx, by, bx):
    del by, bx
    return _dense_pool(x, b, fy, fx, True, cdt)

  def pool_fwd(x, b, fy, fx, by, bx):
    return pool(x, b, fy, fx, by, bx), (b, fy, fx, by, bx)

  def pool_bwd(res, g):
    b, fy, fx, by, bx = res
    spec = jax.ShapeDtypeStruct(input.shape, input.dtype)  # static: safe to close over
    (dx,) = jax.linear_transpose(lambda x: _dense_pool(x, b, by, bx, True, cdt), spec)(g)
    zeros = lambda a: jnp.zeros_like(a)
    return dx, np.zeros(b.shape, jax.dtypes.float0), zeros(fy), zeros(fx), zeros(by), zeros(bx)

  pool.defvjp(pool_fwd, pool_bwd)
  return pool(input, batch, *forward, *backward)


def ps_roi_pool(
    input: jax.Array,  # noqa: A002
    boxes,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """Position-sensitive RoI pooling (torchvision): the average over quantised bin
  ``(i, j)`` of input channel ``c * ph * pw + i * pw + j``; empty bins give 0.

  As torchvision, the forward never reads the last row and column of the input (bin
  ends are clipped to ``H - 1``, ``W - 1``) while the gradient is torchvision's
  backward kernel's, which clips them to ``H``, ``W``; inside the image both agree.
  Gradients reach the input only (quantised boxes have none).

  Returns:
    ``[K, C / (ph * pw), ph, pw]`` in the input's dtype.
  """
  op = "ps_roi_pool"
  input = _nchw(op, input, layout)
  out = _ps_roi_pool(input, _boxes_array(op, boxes, input),
                     output_size=_output_size(op, output_size), spatial_scale=float(spatial_scale))
  return _from_nchw(out, layout)


@functools.partial(jax.jit, static_argnames=("output_size", "spatial_scale"))
def _ps_roi_pool(input: jax.Array, boxes: jax.Array, *, output_size: tuple[int, int],  # noqa: A002
                 spatial_scale: float) -> jax.Array:
  ph, pw = output_size
  cdt, batch, xyxy, valid = _input_and_boxes("ps_roi_pool", input, boxes, ph * pw)
  n, c, h, w = input.shape
  k = batch.shape[0]
  if k == 0:
    return jnp.zeros((0, c // (ph * pw), ph, pw), input.dtype)

  def box_weights(lo, hi, size):  # 1 / extent on the bin's rows: the mean, separably
    inside = (jnp.arange(size) >= lo[..., None]) & (jnp.arange(size) < hi[..., None])
    extent = jnp.maximum(hi - lo, 1).astype(cdt)[..., None]
    return jnp.where(inside, 1 / extent, 0).astype(cdt)

  weights = []
  for limit_h, limit_w in ((h - 1, w - 1), (h, w)):
    hs, he, ws, we = _quantised_bins(xyxy, spatial_scale, ph, pw, limit_h, limit_w,
                                     plus_one=False, cdt=cdt)
    weights.append((box_weights(hs, he, h)[:, :, None],  # [K, ph, 1, H]
                    box_weights(ws, we, w)[:, None]))  # [K, 1, pw, W]
  out = _ps_roi_pool_linear(input, batch, weights[0], weights[1], cdt)
  return _zero_invalid(out, valid).astype(input.dtype)


__all__ = ["deform_roi_pool", "ps_roi_align", "ps_roi_pool", "roi_align", "roi_pool"]
