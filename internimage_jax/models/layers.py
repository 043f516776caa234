"""Building blocks shared by the InternImage modules, initialised as the original."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any

# LayerNorm eps everywhere in InternImage; BatchNorm (classification head) uses 1e-5.
LN_EPS = 1e-6
BN_EPS = 1e-5


def trunc_normal(std: float = 0.02, bound: float = 2.0) -> nnx.Initializer:
  """timm's ``trunc_normal_(std=std)``: a normal truncated at +-``bound`` absolute."""

  def init(key, shape, dtype=jnp.float32):
    return (jax.random.truncated_normal(key, -bound / std, bound / std, shape, jnp.float32)
            * std).astype(dtype)

  return init


# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), which
# is variance scaling with scale 1/3. The original leaves its convolutions at this.
torch_conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> nnx.Initializer:
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU of ``torch.nn.GELU()``."""
  return jax.nn.gelu(x, approximate=False)


def layer_norm(features: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: E[x^2]-E[x]^2 loses digits in float32 on large activations.
  return nnx.LayerNorm(features, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)


def linear(din: int, dout: int, *, use_bias: bool = True, kernel_init: nnx.Initializer | None = None,
           dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A linear layer with the original's default init (trunc normal 0.02, zero bias)."""
  return nnx.Linear(din, dout, use_bias=use_bias, kernel_init=kernel_init or trunc_normal(),
                    bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def conv(din: int, dout: int, kernel: int, *, stride: int = 1, groups: int = 1,
         use_bias: bool = True, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A square convolution with PyTorch's padding ``(k-1)//2`` and default init."""
  pad = (kernel - 1) // 2
  return nnx.Conv(
      din, dout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      feature_group_count=groups, use_bias=use_bias, kernel_init=torch_conv_kernel_init,
      bias_init=torch_conv_bias_init(din // groups * kernel * kernel), dtype=dtype,
      param_dtype=param_dtype, rngs=rngs)


class BatchNormStat(nnx.BatchStat):
  """Running statistics of :class:`BatchNorm2d`, updated in training mode."""


class BatchNorm2d(nnx.Module):
  """``torch.nn.BatchNorm2d`` on NHWC input, with PyTorch's names and update rule.

  The running variance is updated with the unbiased batch variance and momentum
  0.1, as PyTorch does; ``num_batches_tracked`` is kept so an official state dict
  round-trips exactly.
  """

  def __init__(self, features: int, *, momentum: float = 0.1, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, use_running_average: bool = False):
    self.weight = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.running_mean = BatchNormStat(jnp.zeros((features,), param_dtype))
    self.running_var = BatchNormStat(jnp.ones((features,), param_dtype))
    self.num_batches_tracked = BatchNormStat(jnp.zeros((), jnp.int32))
    self.momentum = momentum
    self.dtype = dtype
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or jnp.result_type(x, self.weight[...])
    stat_dtype = jnp.promote_types(dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    if self.use_running_average:
      mean, var = self.running_mean[...].astype(stat_dtype), self.running_var[...].astype(stat_dtype)
    else:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xs, axes)
      var = jnp.mean(jnp.square(xs - mean), axes)
      count = math.prod(x.shape[:-1])
      unbiased = var * (count / max(count - 1, 1))
      m = self.momentum
      self.running_mean[...] = ((1 - m) * self.running_mean[...] + m * mean).astype(
          self.running_mean[...].dtype)
      self.running_var[...] = ((1 - m) * self.running_var[...] + m * unbiased).astype(
          self.running_var[...].dtype)
      self.num_batches_tracked[...] = self.num_batches_tracked[...] + 1
    y = (xs - mean) * jax.lax.rsqrt(var + BN_EPS)
    return (y * self.weight[...] + self.bias[...]).astype(dtype)


class DropPath(nnx.Module):
  """Stochastic depth per sample (timm's ``DropPath``: kept paths scaled by 1/keep)."""

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None, deterministic: bool = False):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    self.rate = rate
    self.deterministic = deterministic
    # Like nnx.Dropout: a forked "dropout" stream, so each block draws its own masks.
    self.rngs = rngs["dropout"].fork() if (rngs is not None and rate > 0) else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.deterministic or self.rate == 0.0:
      return x
    if self.rngs is None:
      raise ValueError("DropPath with a positive rate needs rngs in training mode")
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MLP(nnx.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, channels: int, hidden: int, *, drop: float, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.fc1 = linear(channels, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = linear(hidden, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.drop(self.fc2(self.drop(gelu(self.fc1(x)))))


class TorchNamed:
  """Mixin: how this module's children are named in the official state dict.

  ``torch_names`` maps a child attribute to its official path relative to this
  module; ``{}`` in the value is filled with the next path element (a list index).
  Unlisted children keep their attribute name.
  """

  torch_names: ClassVar[dict[str, str]] = {}
