"""Mask R-CNN's training targets and losses as mmdetection computes them (spec
``detection.md`` section 10): ``MaxIoUAssigner``, ``RandomSampler`` (or fixed samples),
the RPN and RoI-head losses with mmdet's divisors. One image at a time, static shapes:
ground truths come in ``G`` slots with a validity mask."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from internimage_jax.models.detection.boxes import RCNN_STDS, RPN_STDS, encode
from internimage_jax.models.detection.boxes import iou as boxes_iou
from internimage_jax.ops import roi_align

# mmdet's weight_reduce_loss adds float32's machine epsilon to every average factor.
EPS = 1.1920929e-07


class Assigner(NamedTuple):
  """``MaxIoUAssigner`` thresholds (mmdet's names)."""

  pos_iou_thr: float
  neg_iou_thr: float
  min_pos_iou: float


RPN_ASSIGNER = Assigner(pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3)
RCNN_ASSIGNER = Assigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5)


def assign(boxes: jax.Array, gt: jax.Array, gt_valid: jax.Array, cfg: Assigner) -> jax.Array:
  """``MaxIoUAssigner`` with ``match_low_quality``: per box ``-1`` ignore, ``0`` negative,
  ``k > 0`` positive for ground truth ``k - 1``.

  Negative if the best IoU is in ``[0, neg_iou_thr)``, positive (best ground truth) if
  it is at least ``pos_iou_thr``; then every ground truth whose best IoU is at least
  ``min_pos_iou`` takes every box at exactly that IoU (later ground truths win).
  Without valid ground truths every box is negative.

  IoUs are float32 in any run: mmdet's training sees float32 ground truths and anchors,
  and near-ties decide the low-quality matches (with float64 IoUs, 7 of the 3072 anchors
  of the ``det_mini_t`` golden are assigned differently; with float32, none).
  """
  gt, boxes = gt.astype(jnp.float32), boxes.astype(jnp.float32)
  # mmdet's bbox_overlaps: the union clamped at 1e-6.
  iou = jnp.where(gt_valid[:, None], boxes_iou(gt, boxes, min_union=1e-6), 0)  # [G, M]
  best = jnp.max(iou, axis=0)
  best_gt = jnp.argmax(iou, axis=0)
  assigned = jnp.full(boxes.shape[:1], -1, jnp.int32)
  assigned = jnp.where((best >= 0) & (best < cfg.neg_iou_thr), 0, assigned)
  assigned = jnp.where(best >= cfg.pos_iou_thr, best_gt + 1, assigned)
  gt_best = jnp.max(iou, axis=1)  # [G]
  takes = (gt_valid & (gt_best >= cfg.min_pos_iou))[:, None] & (iou == gt_best[:, None])
  g = gt.shape[0]
  last = g - 1 - jnp.argmax(takes[::-1], axis=0)  # the highest ground truth that takes it
  return jnp.where(jnp.any(takes, axis=0), last + 1, assigned).astype(jnp.int32)


def sample(key: jax.Array, assigned: jax.Array, num: int, pos_fraction: float,
           candidates: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``RandomSampler`` (``neg_pos_ub=-1``): masks of the sampled positives (at most
  ``num * pos_fraction``, uniformly at random) and negatives (``num`` minus the
  positives taken). ``candidates`` excludes entries (padding) from both."""
  ok = jnp.ones_like(assigned, bool) if candidates is None else candidates
  pos_key, neg_key = jax.random.split(key)

  def pick(k, eligible, count):
    # A uniformly random subset of size min(count, eligible): the smallest random keys.
    keys = jnp.where(eligible, jax.random.uniform(k, eligible.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(keys))
    return eligible & (rank < count)

  pos = pick(pos_key, ok & (assigned > 0), int(num * pos_fraction))
  neg = pick(neg_key, ok & (assigned == 0), num - jnp.sum(pos))
  return pos, neg


def from_indices(size: int, indices: jax.Array) -> jax.Array:
  """A mask of ``size`` entries, true at ``indices`` (fixed samples, e.g. the goldens');
  negative indices are padding."""
  indices = jnp.asarray(indices)
  return jnp.zeros((size + 1,), bool).at[jnp.where(indices < 0, size, indices)].set(True)[:size]


def bce_with_logits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """PyTorch's ``binary_cross_entropy_with_logits`` per element."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def rpn_terms(logits: jax.Array, deltas: jax.Array, anchors: jax.Array, gt: jax.Array,
              assigned: jax.Array, pos: jax.Array, neg: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One image's RPN loss sums and their divisor: the sigmoid BCE over the sampled
  anchors, the L1 of the positives' deltas against their encoded ground truths, and the
  number sampled. ``logits [A]``, ``deltas [A, 4]``, ``anchors [A, 4]``: all levels
  concatenated in level order."""
  sampled = pos | neg
  targets = pos.astype(jnp.float32)  # mmdet's labels are float32 targets
  cls = jnp.sum(jnp.where(sampled, bce_with_logits(logits, targets), 0))
  matched = gt[jnp.maximum(assigned - 1, 0)]
  l1 = jnp.abs(deltas - encode(anchors, matched, RPN_STDS))
  return cls, jnp.sum(jnp.where(pos[:, None], l1, 0)), jnp.sum(sampled)


def rpn_losses(*args: jax.Array) -> dict[str, jax.Array]:
  """One image's ``loss_rpn_cls`` and ``loss_rpn_bbox`` (``rpn_terms``' sums divided by
  the number sampled + ``EPS``)."""
  cls, bbox, count = rpn_terms(*args)
  return {"loss_rpn_cls": cls / (count + EPS), "loss_rpn_bbox": bbox / (count + EPS)}


def rcnn_targets(rois: jax.Array, gt: jax.Array, gt_labels: jax.Array, assigned: jax.Array,
                 pos: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Classification labels (the ground truth's class for positives, ``num_classes``
  for the rest) and float32 regression targets (zero except for positives)."""
  index = jnp.maximum(assigned - 1, 0)
  labels = jnp.where(pos, gt_labels[index], num_classes).astype(jnp.int32)
  targets = jnp.where(pos[:, None], encode(rois, gt[index], RCNN_STDS), 0)
  return labels, targets


def mask_targets(gt_masks: jax.Array, rois: jax.Array, gt_index: jax.Array,
                 image_shape: jax.Array, size: int = 28) -> jax.Array:
  """mmdet's ``mask_target``: each positive RoI (clipped to the image) cut from its
  ground truth's 0/1 mask by RoIAlign (``size`` x ``size``, aligned, adaptive sampling),
  binarised at 0.5 (float32, as mmdet returns them). ``gt_masks [G, H, W]``, ``rois
  [P, 4]``; the RoIAlign runs in the boxes' precision (at least float32), as mmdet's."""
  dtype = jnp.promote_types(rois.dtype, jnp.float32)
  rois = rois.astype(dtype)
  h, w = image_shape[0], image_shape[1]
  clipped = jnp.stack([jnp.clip(rois[:, 0], 0, w), jnp.clip(rois[:, 1], 0, h),
                       jnp.clip(rois[:, 2], 0, w), jnp.clip(rois[:, 3], 0, h)], axis=1)
  rows = jnp.concatenate([gt_index[:, None].astype(dtype), clipped], axis=1)
  masks = gt_masks.astype(dtype)[:, None]  # [G, 1, H, W]
  cut = roi_align(masks, rows, size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
  return (cut[:, 0] >= 0.5).astype(jnp.float32)


def rcnn_terms(logits: jax.Array, deltas: jax.Array, labels: jax.Array, targets: jax.Array,
               pos: jax.Array, sampled: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One image's box-head loss sums and their divisor: softmax cross-entropy over the
  sampled RoIs, the L1 of the positives' class-specific deltas, the number sampled."""
  ce = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  classes = deltas.shape[-1] // 4
  own = jnp.take_along_axis(deltas.reshape(-1, classes, 4),
                            jnp.minimum(labels, classes - 1)[:, None, None], axis=1)[:, 0]
  return (jnp.sum(jnp.where(sampled, ce, 0)),
          jnp.sum(jnp.where(pos[:, None], jnp.abs(own - targets), 0)), jnp.sum(sampled))


def rcnn_losses(*args: jax.Array) -> dict[str, jax.Array]:
  """One image's ``loss_cls`` and ``loss_bbox``, both divided by the number of sampled
  RoIs + ``EPS`` (not by the positives)."""
  cls, bbox, count = rcnn_terms(*args)
  return {"loss_cls": cls / (count + EPS), "loss_bbox": bbox / (count + EPS)}


def mask_terms(mask_logits: jax.Array, targets: jax.Array, pos: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
  """The BCE sum of the positives' ground-truth-class logit maps ``[P, s, s]`` against
  their targets, and its divisor ``P * s * s`` (``pos`` marks the real rows)."""
  per_roi = jnp.sum(bce_with_logits(mask_logits, targets), axis=(1, 2))
  count = jnp.sum(pos) * mask_logits.shape[1] * mask_logits.shape[2]
  return jnp.sum(jnp.where(pos, per_roi, 0)), count


def mask_loss(*args: jax.Array) -> jax.Array:
  """One image's ``loss_mask``: the mean BCE over ``P * s * s`` (0 without positives)."""
  total, count = mask_terms(*args)
  return total / jnp.maximum(count, 1)
