"""Flax NNX modules around the deformable operators: DCNv1 / DCNv2 convolutions and
deformable RoI pooling, initialised as the originals (mmcv's ``*Pack`` modules).

Layout is the operators' (torchvision's): NCHW input, parameters in PyTorch layout
and under mmcv's names (``weight``, ``bias``, ``conv_offset``, ``offset_fc``), so a
state dict maps one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.layers import Dtype, torch_conv_bias_init
from internimage_jax.ops.deform import deform_conv2d
from internimage_jax.ops.roi import deform_roi_pool
from pallas_kernels.dcnv3.params import IntOrPair, pair


class _ZeroConv2d(nnx.Module):
  """An NCHW convolution, PyTorch-layout ``[out, in, kh, kw]``, initialised to zero."""

  def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], *,
               stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
               dtype: Dtype, param_dtype: Dtype):
    self.weight = nnx.Param(jnp.zeros((out_channels, in_channels, *kernel), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype))
    self.stride, self.padding, self.dilation = stride, padding, dilation
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x.dtype, self.weight[...].dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(dtype), self.weight[...].astype(dtype), self.stride,
        [(p, p) for p in self.padding], rhs_dilation=self.dilation,
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + self.bias[...].astype(dtype)[:, None, None]


class DeformConv2d(nnx.Module):
  """Deformable convolution v1 with its own offset branch, on NCHW input.

  A regular convolution weight (PyTorch's default init) samples at positions moved
  by offsets that a convolution over the input predicts (same kernel, stride,
  padding and dilation). That offset convolution starts at zero, so a fresh module
  is the plain convolution.
  """

  modulated: bool = False

  def __init__(
      self, in_channels: int, out_channels: int, kernel_size: IntOrPair, stride: IntOrPair = 1,
      padding: IntOrPair = 0, dilation: IntOrPair = 1, groups: int = 1, offset_groups: int = 1,
      use_bias: bool = True, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs):
    name = type(self).__name__
    if groups < 1 or in_channels % groups or out_channels % groups:
      raise ValueError(f"{name}: in_channels ({in_channels}) and out_channels ({out_channels}) "
                       f"must be divisible by groups ({groups})")
    if offset_groups < 1 or in_channels % offset_groups:
      raise ValueError(f"{name}: in_channels ({in_channels}) must be divisible by "
                       f"offset_groups ({offset_groups})")
    kernel = pair(kernel_size, "kernel_size")
    self.stride, self.padding = pair(stride, "stride"), pair(padding, "padding")
    self.dilation = pair(dilation, "dilation")
    self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel
    self.groups, self.offset_groups = groups, offset_groups
    self.dtype = dtype
    # PyTorch's default init of weight (kaiming_uniform(a=sqrt(5))) and bias alike.
    init = torch_conv_bias_init(in_channels // groups * kernel[0] * kernel[1])
    self.weight = nnx.Param(init(rngs.params(), (out_channels, in_channels // groups, *kernel),
                                 param_dtype))
    self.bias = (nnx.Param(init(rngs.params(), (out_channels,), param_dtype))
                 if use_bias else nnx.data(None))
    # (dy, dx) per offset group and kernel point; DCNv2 adds one mask logit each.
    per_point = 3 if self.modulated else 2
    self.conv_offset = _ZeroConv2d(
        in_channels, per_point * offset_groups * kernel[0] * kernel[1], kernel,
        stride=self.stride, padding=self.padding, dilation=self.dilation, dtype=dtype,
        param_dtype=param_dtype)

  def _offset_and_mask(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    return self.conv_offset(x), None

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.ndim != 4 or x.shape[1] != self.in_channels:
      raise ValueError(f"{type(self).__name__}: expected input [N, {self.in_channels}, H, W], "
                       f"got shape {tuple(x.shape)}")
    weight = self.weight[...]
    dtype = self.dtype or jnp.result_type(x.dtype, weight.dtype)
    x = x.astype(dtype)
    offset, mask = self._offset_and_mask(x)
    bias = None if self.bias is None else self.bias[...].astype(dtype)
    return deform_conv2d(x, offset.astype(dtype), weight.astype(dtype), bias, self.stride,
                         self.padding, self.dilation,
                         None if mask is None else mask.astype(dtype))


class ModulatedDeformConv2d(DeformConv2d):
  """Deformable convolution v2: offsets and a sigmoid modulation mask, on NCHW input.

  The offset convolution predicts ``3 * offset_groups * kh * kw`` channels: offsets
  first, then mask logits. It starts at zero, so a fresh module samples the regular
  grid with mask ``sigmoid(0) = 0.5``, as in the original (DCNv2 and mmcv): half the
  plain convolution without bias, plus the bias.
  """

  modulated: bool = True

  def _offset_and_mask(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    out = self.conv_offset(x)
    split = 2 * self.offset_groups * self.kernel_size[0] * self.kernel_size[1]
    return out[:, :split], jax.nn.sigmoid(out[:, split:])


class DeformRoIPool(nnx.Module):
  """Deformable RoI pooling with learned offsets (Deformable ConvNets, mmcv's Pack).

  Plain RoIAlign-style pooling first (no offsets), then a zero-initialised fully
  connected layer on the flattened pooled features predicts the normalised offsets
  ``[K, 2, ph, pw]``, then deformable pooling with them. A fresh module is aligned
  RoIAlign with the same sampling.
  """

  def __init__(
      self, output_size: IntOrPair, spatial_scale: float = 1.0, sampling_ratio: int = 0,
      gamma: float = 0.1, *, channels: int, dtype: Dtype = None,
      param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.output_size = pair(output_size, "output_size")
    self.spatial_scale, self.sampling_ratio = float(spatial_scale), int(sampling_ratio)
    self.gamma, self.channels = float(gamma), channels
    ph, pw = self.output_size
    zeros = nnx.initializers.zeros_init()
    self.offset_fc = nnx.Linear(channels * ph * pw, 2 * ph * pw, kernel_init=zeros,
                                bias_init=zeros, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, boxes: jax.Array) -> jax.Array:
    """``x [N, channels, H, W]``, ``boxes [K, 5]`` -> ``[K, channels, ph, pw]``."""
    if x.ndim != 4 or x.shape[1] != self.channels:
      raise ValueError(f"DeformRoIPool: expected input [N, {self.channels}, H, W], got shape "
                       f"{tuple(x.shape)}")
    kw = dict(output_size=self.output_size, spatial_scale=self.spatial_scale,
              sampling_ratio=self.sampling_ratio, gamma=self.gamma)
    pooled = deform_roi_pool(x, boxes, None, **kw)
    offset = self.offset_fc(pooled.reshape(pooled.shape[0], -1))
    offset = offset.reshape(-1, 2, *self.output_size)
    return deform_roi_pool(x, boxes, offset, **kw)
