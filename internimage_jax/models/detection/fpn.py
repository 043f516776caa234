"""mmdetection's ``FPN`` neck on NHWC maps (spec ``detection.md`` section 2)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.layers import Dtype, conv

# mmdet's initialisers: Xavier-uniform (FPN, the box head's shared FCs), zero biases.
XAVIER = nnx.initializers.xavier_uniform()
ZEROS = nnx.initializers.zeros_init()


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """PyTorch's ``interpolate(mode="nearest", size=...)`` source index of each output
  index: ``min(floor(o * (in / out)), in - 1)``, the scale in float32 as PyTorch's
  kernel computes it."""
  scale = np.float32(size_in) / np.float32(size_out)
  index = np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, size_in - 1)


def upsample_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """NHWC ``x`` resized to ``size`` by nearest neighbour, PyTorch's rule."""
  rows = nearest_indices(x.shape[1], int(size[0]))
  cols = nearest_indices(x.shape[2], int(size[1]))
  return x[:, rows][:, :, cols]


class PlainConvModule(nnx.Module):
  """mmcv's ``ConvModule`` without a norm: a convolution with bias (``.conv``, as the
  checkpoints name it), then ReLU if ``relu`` (``segmentation.heads.ConvModule`` is the
  one with BatchNorm)."""

  def __init__(self, din: int, dout: int, kernel: int, *, relu: bool,
               kernel_init: nnx.Initializer = XAVIER, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    self.relu = relu
    self.conv = conv(din, dout, kernel, kernel_init=kernel_init, bias_init=ZEROS, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.conv(x)
    return jax.nn.relu(y) if self.relu else y


class FPN(nnx.Module):
  """Lateral 1x1 convolutions, a top-down sum of nearest-upsampled coarser maps, 3x3
  output convolutions, and ``num_outs - len(in_channels)`` extra levels by stride-2
  subsampling of the coarsest output (mmdet's ``max_pool2d(kernel 1, stride 2)``).
  No norms, no activations."""

  def __init__(self, in_channels: Sequence[int], out_channels: int, num_outs: int = 5, *,
               dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    if num_outs < len(in_channels):
      raise ValueError(f"FPN: num_outs ({num_outs}) must be at least the number of inputs "
                       f"({len(in_channels)})")
    kw = dict(relu=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_outs = num_outs
    self.lateral_convs = nnx.List([PlainConvModule(c, out_channels, 1, **kw) for c in in_channels])
    self.fpn_convs = nnx.List([PlainConvModule(out_channels, out_channels, 3, **kw)
                               for _ in in_channels])

  def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    if len(features) != len(self.lateral_convs):
      raise ValueError(f"FPN: expected {len(self.lateral_convs)} maps, got {len(features)}")
    laterals = [lateral(x) for lateral, x in zip(self.lateral_convs, features)]
    for i in range(len(laterals) - 1, 0, -1):  # cumulative, from the coarsest
      laterals[i - 1] = laterals[i - 1] + upsample_nearest(laterals[i],
                                                           laterals[i - 1].shape[1:3])
    outs = [fpn(x) for fpn, x in zip(self.fpn_convs, laterals)]
    while len(outs) < self.num_outs:
      outs.append(outs[-1][:, ::2, ::2])
    return outs
