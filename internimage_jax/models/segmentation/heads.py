"""mmsegmentation's decode heads on NHWC maps (spec ``segmentation.md`` sections 2-4):
``ConvModule``, PyTorch's adaptive average pooling, bilinear ``resize``, ``UperHead`` and
``FCNHead``, with mmseg's parameter names and initialisation."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.layers import BatchNorm2d, Dtype, conv

# mmcv's ConvModule init: kaiming normal, fan_out, ReLU gain (std sqrt(2 / fan_out)).
KAIMING_FAN_OUT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# mmseg's cls_seg init: normal std 0.01, bias 0.
CONV_SEG_INIT = nnx.initializers.normal(0.01)


def resize(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """mmseg's ``resize`` (bilinear, ``align_corners=False``) of NHWC ``x`` to ``size``.

  Half-pixel centres and no antialiasing, also when shrinking (spec 2.3): the default
  ``antialias=True`` of ``jax.image.resize`` widens the kernel on downsampling.
  """
  h, w = (int(s) for s in size)
  if (h, w) == tuple(x.shape[1:3]):
    return x
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), method="linear", antialias=False)


def _pool_matrix(n: int, o: int) -> np.ndarray:
  """``[o, n]`` averaging weights of PyTorch's adaptive pooling bins on one axis: bin
  ``i`` covers ``[floor(i*n/o), ceil((i+1)*n/o))`` (bins may overlap)."""
  m = np.zeros((o, n))
  for i in range(o):
    start, stop = (i * n) // o, -((-(i + 1) * n) // o)
    m[i, start:stop] = 1.0 / (stop - start)
  return m


def adaptive_avg_pool(x: jax.Array, size: int) -> jax.Array:
  """``nn.AdaptiveAvgPool2d(size)`` on NHWC ``x``. A 2-D bin is a rectangle, so its mean
  is the row average of the column averages (divisor = number of cells)."""
  rows = jnp.asarray(_pool_matrix(x.shape[1], size), x.dtype)
  cols = jnp.asarray(_pool_matrix(x.shape[2], size), x.dtype)
  return jnp.einsum("ih,nhwc,jw->nijc", rows, x, cols)


class ConvModule(nnx.Module):
  """mmcv's ConvModule as the heads use it: conv (no bias) -> BatchNorm -> ReLU."""

  def __init__(self, din: int, dout: int, kernel: int, *, dilation: int = 1,
               padding: int | None = None, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    # bias='auto': a conv followed by a norm has no bias.
    self.conv = conv(din, dout, kernel, dilation=dilation,
                     padding=kernel // 2 * dilation if padding is None else padding,
                     use_bias=False, kernel_init=KAIMING_FAN_OUT, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
    self.bn = BatchNorm2d(dout, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x)))


class PoolingBranch(nnx.Module):
  """One PPM branch: adaptive average pooling to ``scale`` x ``scale`` then a 1x1
  ConvModule, run at the pooled size (official ``psp_modules.j.1``)."""

  def __init__(self, scale: int, din: int, dout: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.scale = scale
    self.conv_module = ConvModule(din, dout, 1, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv_module(adaptive_avg_pool(x, self.scale))


class SegHead(nnx.Module):
  """What every mmseg decode head ends with (``cls_seg``): Dropout2d (whole channels of
  a sample, training only) then ``conv_seg``, a 1x1 conv with bias."""

  def _init_classifier(self, channels: int, num_classes: int, dropout_ratio: float,
                       align_corners: bool, dtype: Dtype, param_dtype: Dtype,
                       rngs: nnx.Rngs) -> None:
    if align_corners:
      raise ValueError(f"{type(self).__name__}: only align_corners=False (every InternImage "
                       "config) is implemented")
    if num_classes < 1:
      raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, got {num_classes}")
    if not 0.0 <= dropout_ratio < 1.0:
      raise ValueError(
          f"{type(self).__name__}: dropout_ratio must be in [0, 1), got {dropout_ratio}")
    self.num_classes = num_classes
    # Dropout2d on NHWC: one draw per (sample, channel), broadcast over H and W.
    self.dropout = nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), rngs=rngs)
    self.conv_seg = conv(channels, num_classes, 1, kernel_init=CONV_SEG_INIT,
                         bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)

  def cls_seg(self, x: jax.Array) -> jax.Array:
    return self.conv_seg(self.dropout(x))

  def _check_map(self, inputs: Sequence[jax.Array], index: int, channels: int) -> jax.Array:
    x = inputs[index]
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{type(self).__name__}: map {index} must be NHWC with {channels} "
                       f"channels, got shape {tuple(x.shape)}")
    return x


class UperHead(SegHead):
  """mmseg's ``UPerHead``: PPM on the last map, FPN top-down path, fusion at the
  resolution of the first map (spec section 3). Called on the list of the four NHWC
  backbone maps; returns NHWC logits at the first map's resolution.

  A new head is in evaluation mode (running BatchNorm statistics, no dropout), like
  the backbone; ``head.train()`` switches to batch statistics and Dropout2d.
  """

  def __init__(self, *, in_channels: Sequence[int], channels: int, num_classes: int,
               pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1,
               align_corners: bool = False, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    in_channels, pool_scales = tuple(in_channels), tuple(pool_scales)
    if len(in_channels) < 2 or any(c < 1 for c in in_channels) or channels < 1:
      raise ValueError(f"UperHead: in_channels needs >= 2 positive entries and channels "
                       f"must be positive, got {in_channels}, {channels}")
    if not pool_scales or any(s < 1 for s in pool_scales):
      raise ValueError(f"UperHead: pool_scales must be positive, got {pool_scales}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_channels, self.channels = in_channels, channels
    self.psp_modules = nnx.List([PoolingBranch(s, in_channels[-1], channels, **kw)
                                 for s in pool_scales])
    self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3,
                                 **kw)
    self.lateral_convs = nnx.List([ConvModule(c, channels, 1, **kw)
                                   for c in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(channels, channels, 3, **kw)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, **kw)
    self._init_classifier(channels, num_classes, dropout_ratio, align_corners, dtype,
                          param_dtype, rngs)
    self.eval()

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    if len(inputs) != len(self.in_channels):
      raise ValueError(f"UperHead: expected {len(self.in_channels)} maps, got {len(inputs)}")
    xs = [self._check_map(inputs, i, c) for i, c in enumerate(self.in_channels)]
    top = xs[-1]
    size = top.shape[1:3]
    # PPM: each branch convolves at its pooled size, then is resized to the map.
    pooled = [resize(branch(top), size) for branch in self.psp_modules]
    laterals = [lateral(x) for lateral, x in zip(self.lateral_convs, xs[:-1])]
    laterals.append(self.bottleneck(jnp.concatenate([top, *pooled], axis=-1)))
    # Top-down, coarse to fine, each addition reading the already-updated coarser map.
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[1:3])
    outs = [fpn(lat) for fpn, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
    # Every level is resized straight to the finest map, not chained through the others.
    size = outs[0].shape[1:3]
    fused = self.fpn_bottleneck(jnp.concatenate([resize(o, size) for o in outs], axis=-1))
    return self.cls_seg(fused)


class FCNHead(SegHead):
  """mmseg's ``FCNHead`` (the auxiliary head of the UperNet configs, spec section 4) on
  map ``in_index`` of the list; returns NHWC logits at that map's resolution.

  A new head is in evaluation mode; ``head.train()`` switches to batch statistics and
  Dropout2d.
  """

  def __init__(self, *, in_channels: int, channels: int, num_classes: int, in_index: int = 2,
               num_convs: int = 2, kernel_size: int = 3, dilation: int = 1,
               concat_input: bool = True, dropout_ratio: float = 0.1,
               align_corners: bool = False, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    problems = [
        (in_channels < 1 or channels < 1,
         f"in_channels and channels must be positive, got {in_channels}, {channels}"),
        (num_convs < 0, f"num_convs must be >= 0, got {num_convs}"),
        (dilation < 1 or kernel_size < 1,
         f"kernel_size and dilation must be positive, got {kernel_size}, {dilation}"),
        (in_index < 0, f"in_index must be >= 0, got {in_index}"),
        # Without convs the head's features are its input (mmseg asserts the same).
        (num_convs == 0 and in_channels != channels,
         f"num_convs=0 needs in_channels == channels, got {in_channels}, {channels}")]
    for bad, message in problems:
      if bad:
        raise ValueError(f"FCNHead: {message}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.in_channels, self.channels, self.in_index = in_channels, channels, in_index
    self.convs = nnx.List([
        ConvModule(in_channels if j == 0 else channels, channels, kernel_size,
                   dilation=dilation, **kw) for j in range(num_convs)])
    # conv_cat pads k//2 and has no dilation, whatever the chain's dilation.
    self.conv_cat = (ConvModule(in_channels + channels, channels, kernel_size, **kw)
                     if concat_input else None)
    self._init_classifier(channels, num_classes, dropout_ratio, align_corners, dtype,
                          param_dtype, rngs)
    self.eval()

  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    if len(inputs) <= self.in_index:
      raise ValueError(f"FCNHead: reads map {self.in_index}, got {len(inputs)} maps")
    x = self._check_map(inputs, self.in_index, self.in_channels)
    feats = x
    for module in self.convs:
      feats = module(feats)
    if self.conv_cat is not None:
      feats = self.conv_cat(jnp.concatenate([x, feats], axis=-1))
    return self.cls_seg(feats)
