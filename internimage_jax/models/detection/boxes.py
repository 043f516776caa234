"""Boxes as mmdetection computes them (spec ``detection.md`` sections 3, 5 and 6):
anchors, the delta box coder, IoU and greedy NMS with static shapes.

Boxes are ``(x1, y1, x2, y2)`` in input pixels; widths are ``x2 - x1`` (no +1 anywhere).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# mmdet's wh_ratio_clip: a delta scales a width or height by at most 1000/16.
WH_RATIO_CLIP = 16 / 1000
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)


def anchors(feature_size: Sequence[int], stride: int, *, scales: Sequence[float] = (8,),
            ratios: Sequence[float] = (0.5, 1.0, 2.0), dtype=np.float32) -> np.ndarray:
  """mmdet's ``AnchorGenerator.grid_priors`` for one level: ``[H*W*A, 4]``, ordered
  (y, x, anchor), anchor ``a = ratio_index * len(scales) + scale_index``.

  Base anchors are centred at 0 (cell ``(y, x)`` adds ``(x*s, y*s)``), ratio = h/w,
  computed in ``dtype`` in mmdet's order of operations (float32 rounds sqrt(0.5) as the
  original does).
  """
  h, w = (int(v) for v in feature_size)
  dtype = np.dtype(dtype)
  one, half, step = (np.asarray(v, dtype) for v in (1, 0.5, stride))
  h_ratios = np.sqrt(np.asarray(ratios, dtype))
  w_ratios = one / h_ratios
  scales_ = np.asarray(scales, dtype)
  ws = (step * w_ratios[:, None] * scales_[None, :]).reshape(-1)
  hs = (step * h_ratios[:, None] * scales_[None, :]).reshape(-1)
  base = np.stack([-half * ws, -half * hs, half * ws, half * hs], axis=-1)  # [A, 4]
  xx = np.tile(np.arange(w, dtype=dtype) * step, h)
  yy = np.repeat(np.arange(h, dtype=dtype) * step, w)
  shifts = np.stack([xx, yy, xx, yy], axis=-1)  # [H*W, 4]
  return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4).astype(dtype)


def decode(boxes: jax.Array, deltas: jax.Array, image_shape: jax.Array | Sequence[int] | None,
           stds: Sequence[float] = RPN_STDS) -> jax.Array:
  """mmdet's ``DeltaXYWHBBoxCoder.decode`` (means 0): ``deltas`` ``(dx, dy, dw, dh)`` move
  and scale ``boxes``; only ``dw``, ``dh`` are clamped (to +-|ln(16/1000)|); the result
  is clipped to ``[0, W] x [0, H]`` of ``image_shape`` ``(H, W)`` (None: not clipped).
  Broadcasts over leading dimensions."""
  d = deltas * jnp.asarray(stds, deltas.dtype)
  pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
  pwh = boxes[..., 2:] - boxes[..., :2]
  limit = abs(float(np.log(WH_RATIO_CLIP)))  # |ln(16/1000)| = 4.1352
  dwh = jnp.clip(d[..., 2:], -limit, limit)
  gxy = pxy + pwh * d[..., :2]
  gwh = pwh * jnp.exp(dwh)
  out = jnp.concatenate([gxy - gwh * 0.5, gxy + gwh * 0.5], axis=-1)
  if image_shape is None:
    return out
  shape = jnp.asarray(image_shape, out.dtype)
  upper = jnp.stack([shape[..., 1], shape[..., 0], shape[..., 1], shape[..., 0]], axis=-1)
  return jnp.clip(out, 0, upper)


def encode(boxes: jax.Array, targets: jax.Array, stds: Sequence[float] = RCNN_STDS
           ) -> jax.Array:
  """mmdet's ``DeltaXYWHBBoxCoder.encode`` (means 0): the deltas that move ``boxes`` onto
  ``targets``. In float32, as mmdet computes regression targets in any run."""
  boxes = boxes.astype(jnp.float32)
  targets = targets.astype(jnp.float32)
  pxy = (boxes[..., :2] + boxes[..., 2:]) * 0.5
  pwh = boxes[..., 2:] - boxes[..., :2]
  gxy = (targets[..., :2] + targets[..., 2:]) * 0.5
  gwh = targets[..., 2:] - targets[..., :2]
  deltas = jnp.concatenate([(gxy - pxy) / pwh, jnp.log(gwh / pwh)], axis=-1)
  return deltas / jnp.asarray(stds, jnp.float32)


def iou(a: jax.Array, b: jax.Array, min_union: float | None = None) -> jax.Array:
  """``[..., N, M]`` intersection over union of ``a [..., N, 4]`` and ``b [..., M, 4]``.

  By default mmcv's NMS rule, ``inter / (area_a + area_b - inter)`` (0/0 is NaN, which
  suppresses nothing); ``min_union`` clamps the union from below, as mmdet's
  ``bbox_overlaps`` does for the assigners (1e-6)."""
  lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
  rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  wh = jnp.maximum(rb - lt, 0)
  inter = wh[..., 0] * wh[..., 1]
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  union = area_a[..., :, None] + area_b[..., None, :] - inter
  return inter / (union if min_union is None else jnp.maximum(union, min_union))


def nms(boxes: jax.Array, valid: jax.Array, threshold: float,
        groups: jax.Array | None = None) -> jax.Array:
  """Greedy NMS over ``boxes [N, 4]`` already in visiting order (descending score):
  which of them are kept. A box is kept unless an earlier kept box of its group has
  IoU strictly above ``threshold`` with it; invalid boxes are neither kept nor
  suppress. ``groups [N]`` makes NMS independent per group (mmcv's ``batched_nms``)."""
  n = boxes.shape[0]
  if n == 0:
    return jnp.zeros((n,), bool)
  earlier = jnp.arange(n)

  def visit(i, keep):
    # One row of IoUs per step: memory O(N), not the N x N matrix.
    overlaps = iou(boxes[i][None], boxes)[0] > threshold
    if groups is not None:
      overlaps &= groups == groups[i]
    suppressed = jnp.any(keep & overlaps & (earlier < i))
    return keep.at[i].set(valid[i] & ~suppressed)

  return jax.lax.fori_loop(0, n, visit, jnp.zeros((n,), bool))


def compact(keep: jax.Array, scores: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """The indices of the first ``size`` kept entries by descending score (ties: the
  earlier first), padded with index 0, and how many are real."""
  order = jnp.argsort(jnp.where(keep, -scores, jnp.inf), stable=True)[:size]
  count = jnp.minimum(jnp.sum(keep), size)
  if order.shape[0] < size:
    order = jnp.pad(order, (0, size - order.shape[0]))
  return jnp.where(jnp.arange(size) < count, order, 0), count
