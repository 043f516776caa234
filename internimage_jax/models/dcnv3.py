"""The DCNv3 module (spec section 2): projections, offset/mask branch, sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.layers import Dtype, conv, gelu, layer_norm, linear
from internimage_jax.models.partitioning import batch_axes, param
from pallas_kernels.dcnv3 import dcnv3 as dcnv3_op


class DCNv3(nnx.Module):
  """Deformable convolution v3 on channels-last input ``[N, H, W, channels]``.

  Offsets and mask logits come from a depthwise conv -> LayerNorm -> GELU branch;
  the mask is a softmax over each group's points. Offset and mask linears start at
  zero and the projections Xavier-uniform, as in the original, so a fresh module
  samples the fixed 3x3 grid with equal weights.
  """

  def __init__(
      self, *, channels: int, group: int, kernel_size: int = 3,
      dw_kernel_size: int | None = None, offset_scale: float = 1.0,
      center_feature_scale: bool = False, remove_center: bool = False,
      implementation: str = "auto",
      activation_sharding: jax.sharding.NamedSharding | None = None, dtype: Dtype = None,
      param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if group < 1 or channels % group:
      raise ValueError(f"DCNv3: channels ({channels}) must be divisible by group ({group})")
    if remove_center and kernel_size % 2 == 0:
      raise ValueError(f"DCNv3: remove_center needs an odd kernel_size, got {kernel_size}")
    dw_kernel_size = kernel_size if dw_kernel_size is None else dw_kernel_size
    if dw_kernel_size % 2 == 0:
      raise ValueError(f"DCNv3: dw_kernel_size must be odd, got {dw_kernel_size}")
    self.channels, self.group, self.kernel_size = channels, group, kernel_size
    self.offset_scale = float(offset_scale)
    self.remove_center = bool(remove_center)
    self.center_feature_scale = bool(center_feature_scale)
    self.implementation = implementation
    # The batch split of the activations: the sampling runs per device over it.
    self.activation_sharding = activation_sharding
    points = kernel_size * kernel_size - int(self.remove_center)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    xavier = nnx.initializers.xavier_uniform()

    self.input_proj = linear(channels, channels, kernel_init=xavier, **kw)
    self.output_proj = linear(channels, channels, kernel_init=xavier, **kw)
    self.dw_conv = conv(channels, channels, dw_kernel_size, groups=channels, **kw)
    self.dw_norm = layer_norm(channels, **kw)
    self.offset = linear(channels, group * points * 2, kernel_init=zeros, **kw)
    self.mask = linear(channels, group * points, kernel_init=zeros, **kw)
    if self.center_feature_scale:
      self.center_feature_scale_proj_weight = param(jnp.zeros((group, channels), param_dtype),
                                                    None, "embed")
      self.center_feature_scale_proj_bias = param(jnp.zeros((group,), param_dtype), None)

  def __call__(self, u: jax.Array) -> jax.Array:
    if u.ndim != 4 or u.shape[-1] != self.channels:
      raise ValueError(
          f"DCNv3: expected input [N, H, W, {self.channels}], got shape {tuple(u.shape)}")
    n, h, w, _ = u.shape
    v = self.input_proj(u)
    d = gelu(self.dw_norm(self.dw_conv(u)))
    offset = self.offset(d)
    mask = jax.nn.softmax(self.mask(d).reshape(n, h, w, self.group, -1), axis=-1)
    y = dcnv3_op(
        v, offset, mask.reshape(n, h, w, -1).astype(v.dtype), kernel_size=self.kernel_size,
        stride=1, pad=(self.kernel_size - 1) // 2, dilation=1, group=self.group,
        offset_scale=self.offset_scale, remove_center=self.remove_center,
        implementation=self.implementation,
        **({} if self.activation_sharding is None else dict(
            mesh=self.activation_sharding.mesh, batch_axes=batch_axes(self.activation_sharding))))
    if self.center_feature_scale:
      weight = self.center_feature_scale_proj_weight[...].astype(d.dtype)
      bias = self.center_feature_scale_proj_bias[...].astype(d.dtype)
      alpha = jax.nn.sigmoid(d @ weight.T + bias)[..., None]  # [N, H, W, G, 1]
      # Each group's channels share their alpha (a broadcast, not a repeated copy).
      shape = (n, h, w, self.group, self.channels // self.group)
      y = (y.reshape(shape) * (1 - alpha) + v.reshape(shape) * alpha).reshape(y.shape)
    return self.output_proj(y)
