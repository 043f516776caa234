"""mmdetection's ``RPNHead`` and its proposals (spec ``detection.md`` sections 4 and 6),
with static shapes: every image gets ``max_per_img`` proposal slots, the real ones first."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.detection.boxes import RPN_STDS, anchors, compact, decode, nms
from internimage_jax.models.detection.fpn import ZEROS
from internimage_jax.models.layers import Dtype, conv

# mmdet's RPNHead init: normal(std 0.01) convolutions, zero biases.
NORMAL_001 = nnx.initializers.normal(0.01)


class RPNHead(nnx.Module):
  """``relu(conv3x3)`` shared over levels, then 1x1 objectness logits (one per anchor,
  sigmoid) and 1x1 deltas (``4a..4a+3`` for anchor ``a``)."""

  def __init__(self, in_channels: int, feat_channels: int | None = None, *,
               num_anchors: int = 3, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    feat_channels = in_channels if feat_channels is None else feat_channels
    kw = dict(kernel_init=NORMAL_001, bias_init=ZEROS, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs)
    self.num_anchors = num_anchors
    self.rpn_conv = conv(in_channels, feat_channels, 3, **kw)
    self.rpn_cls = conv(feat_channels, num_anchors, 1, **kw)
    self.rpn_reg = conv(feat_channels, 4 * num_anchors, 1, **kw)

  def __call__(self, features: Sequence[jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    """Per level: logits ``[N, H, W, A]`` and deltas ``[N, H, W, 4A]``."""
    hidden = [jax.nn.relu(self.rpn_conv(x)) for x in features]
    return [self.rpn_cls(t) for t in hidden], [self.rpn_reg(t) for t in hidden]


def proposals(logits: Sequence[jax.Array], deltas: Sequence[jax.Array], strides: Sequence[int],
              image_shapes: jax.Array, *, nms_pre: int, max_per_img: int,
              iou_threshold: float = 0.7, min_bbox_size: float = 0.0) -> dict[str, jax.Array]:
  """mmdet's RPN proposals for a batch: per level the ``nms_pre`` best anchors by
  objectness (``nms_pre <= 0``: all), decoded (RPN coder, clipped to each image's
  ``(H, W)`` in ``image_shapes [N, 2]``), kept only if both width and height exceed
  ``min_bbox_size``, NMS within each level, then the best ``max_per_img`` of all levels
  by score. Boxes are decided in float32 at least (a bfloat16 model's maps are cast).

  Returns ``boxes [N, R, 4]``, ``scores [N, R]`` (sigmoid objectness) and ``num [N]``
  with ``R = max_per_img``; entries past ``num`` are zero.
  """
  if max_per_img < 1:
    raise ValueError(f"proposals: max_per_img must be positive, got {max_per_img}")
  dtype = jnp.promote_types(logits[0].dtype, jnp.float32)
  logits = [x.astype(dtype) for x in logits]
  deltas = [x.astype(dtype) for x in deltas]
  level_anchors = [jnp.asarray(anchors(x.shape[1:3], s, dtype=dtype), dtype)
                   for x, s in zip(logits, strides)]

  def one_image(logits, deltas, image_shape):
    boxes, scores, keep = [], [], []
    for cls, reg, priors in zip(logits, deltas, level_anchors):
      score = jax.nn.sigmoid(cls.reshape(-1))  # (y, x, anchor) order, as the anchors
      k = score.shape[0] if nms_pre <= 0 else min(nms_pre, score.shape[0])
      # Descending by score (ties: the earlier anchor first); the visiting order of NMS.
      score, index = jax.lax.top_k(score, k)
      box = decode(priors[index], reg.reshape(-1, 4)[index], image_shape, RPN_STDS)
      wh = box[:, 2:] - box[:, :2]
      valid = (wh[:, 0] > min_bbox_size) & (wh[:, 1] > min_bbox_size)
      boxes.append(box)
      scores.append(score)
      keep.append(nms(box, valid, iou_threshold))  # levels never suppress each other
    boxes, scores, keep = (jnp.concatenate(v) for v in (boxes, scores, keep))
    index, count = compact(keep, scores, max_per_img)
    real = (jnp.arange(max_per_img) < count)
    return {"boxes": jnp.where(real[:, None], boxes[index], 0),
            "scores": jnp.where(real, scores[index], 0), "num": count}

  return jax.vmap(one_image)(list(logits), list(deltas), jnp.asarray(image_shapes))
