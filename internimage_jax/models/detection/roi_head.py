"""mmdetection's ``StandardRoIHead`` pieces (spec ``detection.md`` sections 7-9): RoI
feature extraction from the FPN levels, the shared-FC box head and its detections, the
FCN mask head and mask pasting. Static shapes throughout: a fixed number of RoI slots
per image with a count of the real ones."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.detection.boxes import RCNN_STDS, compact, decode, nms
from internimage_jax.models.detection.fpn import XAVIER, ZEROS, PlainConvModule
from internimage_jax.models.layers import Dtype, conv, linear
from internimage_jax.models.segmentation.heads import KAIMING_FAN_OUT
from internimage_jax.ops import roi_align



def roi_levels(boxes: jax.Array, finest_scale: float = 56, num_levels: int = 4) -> jax.Array:
  """mmdet's ``SingleRoIExtractor.map_roi_levels``: ``floor(log2(sqrt(area) /
  finest_scale + 1e-6))`` clamped to ``[0, num_levels - 1]``."""
  scale = jnp.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
  level = jnp.floor(jnp.log2(scale / finest_scale + 1e-6))
  return jnp.clip(level, 0, num_levels - 1).astype(jnp.int32)


def extract_rois(maps: Sequence[jax.Array], boxes: jax.Array, strides: Sequence[int],
                 output_size: int, finest_scale: float = 56, *, sampling_ratio: int = 0
                 ) -> jax.Array:
  """RoIAlign features ``[K, s, s, C]`` of one image's ``boxes [K, 4]`` from its NHWC
  ``maps`` (``[H, W, C]`` each), each box from its level (mmcv's RoIAlign: aligned,
  average, ``sampling_ratio`` points per bin and axis, 0 for ``ceil(bin size)``).

  Every level pools every box (static shapes), and with adaptive sampling each pooling
  contracts every box with the whole map: ``O(K * s * C * H * W)`` per level, the
  largest cost of a detector's inference on big images.
  """
  levels = roi_levels(boxes, finest_scale, len(maps))
  rows = jnp.concatenate([jnp.zeros_like(boxes[:, :1]), boxes], axis=1)
  out = None
  for level, (feature, stride) in enumerate(zip(maps, strides)):
    pooled = roi_align(feature[None], rows, output_size, spatial_scale=1.0 / stride,
                       sampling_ratio=sampling_ratio, aligned=True, layout="NHWC")
    out = pooled if out is None else jnp.where((levels == level)[:, None, None, None],
                                               pooled, out)
  return out


class Shared2FCBBoxHead(nnx.Module):
  """Flattened RoI features (in PyTorch's ``(C, 7, 7)`` order) -> two ReLU linears ->
  class logits (``num_classes + 1``, background last) and class-specific deltas."""

  def __init__(self, in_channels: int, num_classes: int, *, fc_out_channels: int = 1024,
               roi_feat_size: int = 7, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_classes = num_classes
    din = in_channels * roi_feat_size * roi_feat_size
    self.shared_fcs = nnx.List([
        linear(din, fc_out_channels, kernel_init=XAVIER, **kw),
        linear(fc_out_channels, fc_out_channels, kernel_init=XAVIER, **kw)])
    self.fc_cls = linear(fc_out_channels, num_classes + 1,
                         kernel_init=nnx.initializers.normal(0.01), **kw)
    self.fc_reg = linear(fc_out_channels, 4 * num_classes,
                         kernel_init=nnx.initializers.normal(0.001), **kw)

  def __call__(self, rois: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``rois [K, s, s, C]`` -> logits ``[K, num_classes + 1]``, deltas ``[K, 4 * classes]``."""
    x = jnp.transpose(rois, (0, 3, 1, 2)).reshape(rois.shape[0], -1)
    for fc in self.shared_fcs:
      x = jax.nn.relu(fc(x))
    return self.fc_cls(x), self.fc_reg(x)


def detect(proposals: jax.Array, num: jax.Array, logits: jax.Array, deltas: jax.Array,
           image_shape: jax.Array, *, score_thr: float = 0.05, iou_threshold: float = 0.5,
           max_per_img: int = 100, scale: jax.Array | None = None) -> dict[str, jax.Array]:
  """mmdet's box-head test for one image: softmax scores, per-class decoding (RoI coder,
  clipped), candidates with score strictly above ``score_thr``, NMS per class, the best
  ``max_per_img`` by score. ``proposals [R, 4]`` with ``num`` real ones. Scores and
  boxes are decided in float32 at least (bfloat16 would tie many scores). NMS runs per
  class over all ``R`` proposals, which holds ``C x R`` flags, not ``C x R x R`` IoUs.

  Returns ``boxes [K, 4]``, ``scores [K]``, ``labels [K]`` and ``num``, ``K =
  max_per_img``, padding after ``num`` zero. ``scale`` ``(w, h)``: mmdet's ``rescale``:
  the clipped boxes are divided by the image's resize factors before the NMS, so they
  are in the original image's coordinates.
  """
  if max_per_img < 1:
    raise ValueError(f"detect: max_per_img must be positive, got {max_per_img}")
  dtype = jnp.promote_types(logits.dtype, jnp.float32)
  logits, deltas, proposals = (a.astype(dtype) for a in (logits, deltas, proposals))
  r, classes = logits.shape[0], logits.shape[1] - 1
  probs = jax.nn.softmax(logits, axis=-1)[:, :classes]  # [R, C]
  boxes = decode(proposals[:, None, :], deltas.reshape(r, classes, 4), image_shape, RCNN_STDS)
  if scale is not None:
    boxes = boxes / jnp.tile(scale.astype(dtype), 2)
  real = jnp.arange(r) < num
  candidate = (probs > score_thr) & real[:, None]

  def per_class(boxes, scores, valid):
    # Visiting order: descending score (ties: the earlier proposal first).
    order = jnp.argsort(-scores, stable=True)
    keep = nms(boxes[order], valid[order], iou_threshold)
    return jnp.zeros_like(keep).at[order].set(keep)

  keep = jax.vmap(per_class, in_axes=(1, 1, 1), out_axes=1)(boxes, probs, candidate)  # [R, C]
  # Candidates in mmdet's order (proposal-major, class-minor) before the score sort.
  index, count = compact(keep.reshape(-1), probs.reshape(-1), max_per_img)
  filled = jnp.arange(max_per_img) < count
  return {"boxes": jnp.where(filled[:, None], boxes.reshape(-1, 4)[index], 0),
          "scores": jnp.where(filled, probs.reshape(-1)[index], 0),
          "labels": jnp.where(filled, index % classes, 0).astype(jnp.int32), "num": count}


class ConvTranspose2x2(nnx.Module):
  """PyTorch's ``ConvTranspose2d(kernel 2, stride 2)`` on NHWC input, its weight in
  PyTorch's layout ``[in, out, 2, 2]``: output pixel ``(2i + a, 2j + b)`` is
  ``sum_c x[i, j, c] * weight[c, :, a, b] + bias``."""

  def __init__(self, din: int, dout: int, *, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    # mmdet's init: kaiming normal, fan_out (out * 2 * 2), ReLU gain; zero bias.
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (din, dout, 2, 2), param_dtype)
                            * np.sqrt(2.0 / (dout * 4)))
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    w, b = self.weight[...], self.bias[...]
    if self.dtype is not None:
      x, w, b = x.astype(self.dtype), w.astype(self.dtype), b.astype(self.dtype)
    k, h, wd = x.shape[:3]
    y = jnp.einsum("kijc,coab->kiajbo", x, w).reshape(k, 2 * h, 2 * wd, w.shape[1])
    return y + b


class FCNMaskHead(nnx.Module):
  """Four ReLU 3x3 convolutions, a ReLU 2x2 stride-2 transposed convolution, then 1x1
  logits per class (``[K, 2s, 2s, num_classes]`` from ``[K, s, s, C]``)."""

  def __init__(self, in_channels: int, num_classes: int, *, conv_out_channels: int = 256,
               num_convs: int = 4, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.convs = nnx.List([
        PlainConvModule(in_channels if i == 0 else conv_out_channels, conv_out_channels, 3,
                   relu=True, kernel_init=KAIMING_FAN_OUT, **kw) for i in range(num_convs)])
    self.upsample = ConvTranspose2x2(conv_out_channels, conv_out_channels, **kw)
    self.conv_logits = conv(conv_out_channels, num_classes, 1, kernel_init=KAIMING_FAN_OUT,
                            bias_init=ZEROS, **kw)

  def __call__(self, rois: jax.Array) -> jax.Array:
    x = rois
    for layer in self.convs:
      x = layer(x)
    return self.conv_logits(jax.nn.relu(self.upsample(x)))


def paste_masks(probs: jax.Array, boxes: jax.Array, height: int, width: int) -> jax.Array:
  """mmdet's ``_do_paste_mask``: each ``[M, M]`` probability map ``probs [K, M, M]``
  bilinearly resampled into its box on a ``height x width`` image (pixel centres,
  ``grid_sample`` with ``align_corners=False`` and zero padding), in float32 as mmdet."""
  probs = probs.astype(jnp.float32)
  boxes = boxes.astype(jnp.float32)
  m = probs.shape[-1]
  x0, y0, x1, y1 = (boxes[:, i, None] for i in range(4))
  gx = ((jnp.arange(width, dtype=jnp.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1  # [K, W]
  gy = ((jnp.arange(height, dtype=jnp.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1  # [K, H]
  u = ((gx + 1) * m - 1) / 2  # mask-pixel coordinates
  v = ((gy + 1) * m - 1) / 2

  def taps(p):  # [K, L] -> per-axis bilinear weights [K, L, M] with zero outside
    low = jnp.floor(p)
    frac = p - low
    grid = jnp.arange(m, dtype=jnp.float32)
    return ((grid == low[..., None]) * (1 - frac)[..., None]
            + (grid == (low + 1)[..., None]) * frac[..., None])

  return jnp.einsum("khm,kmn,kwn->khw", taps(v), probs, taps(u))
