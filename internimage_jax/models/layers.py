"""Layers shared by the InternImage modules, initialised as the original; every parameter
names its dimensions (``partitioning.py``)."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes

from internimage_jax.models.partitioning import param, with_axes

Dtype = Any

# LayerNorm eps everywhere in InternImage; BatchNorm (classification head) uses 1e-5.
LN_EPS = 1e-6
BN_EPS = 1e-5

# timm's trunc_normal_(std=0.02), the original's linear init: truncated at +-2 absolute.
TRUNC_NORMAL = nnx.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)
# PyTorch's default Conv2d init, kaiming_uniform(a=sqrt(5)): U(+-1/sqrt(fan_in)), which
# is variance scaling with scale 1/3. The original leaves its convolutions at this.
torch_conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_conv_bias_init(fan_in: int) -> nnx.Initializer:
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """The exact (erf) GELU of ``torch.nn.GELU()``.

  Its gradient keeps only the input: autodiff of ``jax.nn.gelu`` would keep both
  ``erfc`` and ``exp`` terms, two more input-sized buffers per GELU (the 4x MLP
  hidden layer of every block) until the backward pass.
  """
  return jax.nn.gelu(x, approximate=False)


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  # erf, not the forward's erfc: a shared erfc would be one more consumer of the
  # forward's subexpressions, which XLA:CPU then materialises as separate buffers.
  cdf = 0.5 + 0.5 * jax.lax.erf(xs * (1 / math.sqrt(2)))
  pdf = jnp.exp(-0.5 * xs * xs) * (1 / math.sqrt(2 * math.pi))
  return ((g * (cdf + xs * pdf)).astype(g.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  # flax's LayerNorm (two-pass variance) step for step: statistics in at least float32.
  xs = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(xs, axis=-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.mean(jnp.square(xs - mean), axis=-1, keepdims=True) + epsilon)
  y = (xs - mean) * (rstd * scale) + bias
  return y, (x, mean, rstd, scale)


def _layer_norm_bwd(epsilon, residuals, g):
  del epsilon
  x, mean, rstd, scale = residuals
  xhat = (x.astype(mean.dtype) - mean) * rstd
  g = g.astype(mean.dtype)
  axes = tuple(range(x.ndim - 1))
  gs = g * scale
  dx = rstd * (gs - jnp.mean(gs, axis=-1, keepdims=True)
               - xhat * jnp.mean(gs * xhat, axis=-1, keepdims=True))
  return (dx.astype(x.dtype), jnp.sum(g * xhat, axis=axes).astype(scale.dtype),
          jnp.sum(g, axis=axes).astype(scale.dtype))


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
  """``nnx.LayerNorm`` (same parameters, same forward) over the last axis, whose
  gradient keeps only the input and the per-row mean and 1/std: autodiff of the flax
  layer keeps input-sized intermediates (centred input, broadcast scale factors) of
  every norm until the backward pass."""

  def __call__(self, x: jax.Array, *, mask=None) -> jax.Array:
    if (mask is not None or self.scale is None or self.bias is None or self.use_fast_variance
        or self.reduction_axes not in (-1, x.ndim - 1) or self.axis_name is not None):
      return super().__call__(x, mask=mask)
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    y = _layer_norm(x, scale, bias, self.epsilon)
    return y.astype(flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype))


def layer_norm(features: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance: E[x^2]-E[x]^2 loses digits in float32 on large activations.
  return LayerNorm(features, epsilon=LN_EPS, use_fast_variance=False,
                   scale_init=with_axes(nnx.initializers.ones_init(), None),
                   bias_init=with_axes(nnx.initializers.zeros_init(), None),
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def linear(din: int, dout: int, *, axes: tuple[str | None, str | None] = ("embed", None),
           use_bias: bool = True, kernel_init: nnx.Initializer | None = None, dtype: Dtype,
           param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Linear:
  """A linear layer with the original's default init (trunc normal 0.02, zero bias);
  ``axes``: the logical names of its input and output dimensions."""
  return nnx.Linear(din, dout, use_bias=use_bias,
                    kernel_init=with_axes(kernel_init or TRUNC_NORMAL, *axes),
                    bias_init=with_axes(nnx.initializers.zeros_init(), axes[1]), dtype=dtype,
                    param_dtype=param_dtype, rngs=rngs)


def conv(din: int, dout: int, kernel: int, *, stride: int = 1, groups: int = 1,
         dilation: int = 1, padding: int | None = None, use_bias: bool = True,
         kernel_init: nnx.Initializer | None = None, bias_init: nnx.Initializer | None = None,
         dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A square convolution with zero padding (default ``(k-1)//2 * dilation``, PyTorch's
  "same" for odd kernels) and PyTorch's default init unless ``kernel_init``/``bias_init``
  are given (its output channels the ``embed`` dimension)."""
  pad = (kernel - 1) // 2 * dilation if padding is None else padding
  return nnx.Conv(
      din, dout, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
      kernel_dilation=dilation, feature_group_count=groups, use_bias=use_bias,
      kernel_init=with_axes(kernel_init or torch_conv_kernel_init, None, None, None, "embed"),
      bias_init=with_axes(bias_init or torch_conv_bias_init(din // groups * kernel * kernel),
                          None),
      dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class BatchNorm2d(nnx.Module):
  """``torch.nn.BatchNorm2d`` on NHWC input, with PyTorch's names and update rule.

  The running variance is updated with the unbiased batch variance and momentum
  0.1, as PyTorch does; ``num_batches_tracked`` is kept so an official state dict
  round-trips exactly.
  """

  def __init__(self, features: int, *, momentum: float = 0.1, dtype: Dtype = None,
               param_dtype: Dtype = jnp.float32, use_running_average: bool = False):
    self.weight = param(jnp.ones((features,), param_dtype), None)
    self.bias = param(jnp.zeros((features,), param_dtype), None)
    self.running_mean = nnx.BatchStat(jnp.zeros((features,), param_dtype))
    self.running_var = nnx.BatchStat(jnp.ones((features,), param_dtype))
    self.num_batches_tracked = nnx.BatchStat(jnp.zeros((), jnp.int32))
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
  """Stochastic depth per sample (timm's ``DropPath``: kept paths scaled by 1/keep). The
  keep probability comes with each call: the blocks of a level are one stacked module
  and take their rates as data."""

  def __init__(self, *, rngs: nnx.Rngs | None):
    # Like nnx.Dropout: a forked "dropout" stream, so each block draws its own masks.
    self.rngs = rngs["dropout"].fork() if rngs is not None else nnx.data(None)
    self.deterministic = False

  def __call__(self, x: jax.Array, keep: jax.Array | None) -> jax.Array:
    if self.deterministic or keep is None:
      return x
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep).astype(x.dtype), jnp.zeros_like(x))


class MLP(nnx.Module):
  """fc1 -> GELU -> dropout -> fc2 -> dropout."""

  def __init__(self, channels: int, hidden: int, *, drop: float, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = linear(channels, hidden, axes=("embed", "mlp"), **kw)
    self.fc2 = linear(hidden, channels, axes=("mlp", "embed"), **kw)
    self.drop = nnx.Dropout(drop, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.drop(self.fc2(self.drop(gelu(self.fc1(x)))))
