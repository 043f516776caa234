"""Building blocks shared by the InternImage modules, initialised as the original."""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes as flax_dtypes

from internimage_jax.models.stacking import map_params
from pallas_kernels.dcnv3.reference import never

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
  return LayerNorm(features, epsilon=LN_EPS, use_fast_variance=False, dtype=dtype,
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


def _is_float(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def late_remat(fn):
  """``jax.checkpoint(fn)`` (only the inputs are kept for the backward pass) whose
  recomputation cannot start before the output's cotangent exists.

  With plain ``jax.checkpoint`` nothing ties the recomputed forward to the backward
  pass, and XLA (on CPU at least) schedules recomputations early, often right after
  the original forward, so that all of them are alive together and the memory saving
  is lost. Here the backward pass first passes the inputs and the cotangent through
  one ``optimization_barrier``, and recomputes from its outputs.
  """

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    # The small inputs (parameters) pass through a select on the largest (the
    # activation): what is computed from parameters alone (e.g. a LayerNorm scale
    # broadcast to the activation's shape) can then not be hoisted to the start of
    # the program and kept alive until the pass reaches this call.
    leaves, treedef = jax.tree.flatten(args)
    floats = [i for i, x in enumerate(leaves) if _is_float(x) and x.size]
    if len(floats) > 1:
      largest = max(floats, key=lambda i: leaves[i].size)
      false = never(leaves[largest])
      tied = list(leaves)
      for i in floats:
        if i != largest:
          tied[i] = jnp.where(false, jnp.zeros_like(leaves[i]), leaves[i])
      return fn(*jax.tree.unflatten(treedef, tied)), args
    return fn(*args), args

  def bwd(args, cotangent):
    leaves, treedef = jax.tree.flatten((args, cotangent))
    tied = [i for i, x in enumerate(leaves) if _is_float(x)]
    barred = jax.lax.optimization_barrier([leaves[i] for i in tied])
    # XLA:CPU drops optimization barriers before common-subexpression elimination,
    # which then merges the recomputation back into the forward pass (jax.checkpoint
    # saves nothing there). A select on a predicate that is always false but depends
    # on the cotangent makes the recomputation's inputs new values, later in time.
    gates = [x for x in jax.tree.leaves(cotangent) if _is_float(x) and x.size]
    if gates:
      false = never(*gates)
      barred = [jnp.where(false, jnp.zeros_like(x), x) for x in barred]
    for i, x in zip(tied, barred):
      leaves[i] = x
    args, cotangent = jax.tree.unflatten(treedef, leaves)
    _, vjp = jax.vjp(fn, *args)
    return vjp(cotangent)

  wrapped.defvjp(fwd, bwd)
  return wrapped


def gather_param(x: jax.Array, full: jax.sharding.Sharding, split: jax.sharding.Sharding
                 ) -> jax.Array:
  """``x`` placed ``full`` (e.g. replicated) for its use, its gradient placed ``split``
  (the parameter's own sharding): the FSDP all-gather, whose transpose is a
  reduce-scatter rather than an all-reduce of the whole gradient."""

  @jax.custom_vjp
  def gather(x):
    return jax.lax.with_sharding_constraint(x, full)

  def fwd(x):
    return gather(x), None

  def bwd(_, g):
    return (jax.lax.with_sharding_constraint(g, split),)

  gather.defvjp(fwd, bwd)
  return gather(x)


def scan_remat(f, x: jax.Array, xs):
  """``jax.lax.scan(f, x, xs)`` that keeps only each step's input carry for the
  backward pass, which recomputes one step at a time (a rematerialised scan).

  ``f(x, xs_i) -> (x, ys_i)``; the ``ys`` get no gradient (here: RNG counts). Unlike
  ``scan(checkpoint(f))``, whose stacked residual buffers XLA:CPU allocates at the
  start of the program (zero-filled broadcasts that depend on nothing), the stack of
  carries here is created from the carry itself, so it exists only from the scan on.
  Gradients flow to ``x`` and to the floating-point leaves of ``xs``.
  """
  leaves, treedef = jax.tree.flatten(xs)
  floating = [_is_float(leaf) for leaf in leaves]

  def merge(floats, others):
    floats, others = iter(floats), iter(others)
    return jax.tree.unflatten(treedef, [next(floats) if f_ else next(others)
                                        for f_ in floating])

  floats = [leaf for leaf, f_ in zip(leaves, floating) if f_]
  others = [leaf for leaf, f_ in zip(leaves, floating) if not f_]
  length = leaves[0].shape[0]

  @jax.custom_vjp
  def run(x, floats, others):
    return jax.lax.scan(f, x, merge(floats, others))

  def fwd(x, floats, others):
    stack = jnp.broadcast_to(jnp.where(never(x), 1, 0).astype(x.dtype), (length, *x.shape))

    def body(carry, xs_i):
      x, stack, i = carry
      stack = jax.lax.dynamic_update_index_in_dim(stack, x, i, axis=0)
      x, ys_i = f(x, xs_i)
      return (x, stack, i + 1), ys_i

    (x, stack, _), ys = jax.lax.scan(body, (x, stack, 0), merge(floats, others))
    return (x, ys), (stack, floats, others)

  def bwd(residuals, cotangent):
    stack, floats, others = residuals

    def body(g, step):
      x_i, floats_i, others_i = step
      _, vjp = jax.vjp(lambda x, fl: f(x, merge(fl, others_i))[0], x_i, floats_i)
      return vjp(g)

    grad_x, grad_floats = jax.lax.scan(
        body, cotangent[0], (stack, floats, others), reverse=True)
    grad_others = [np.zeros(o.shape, jax.dtypes.float0) for o in others]
    return grad_x, grad_floats, grad_others

  run.defvjp(fwd, bwd)
  return run(x, floats, others)


def remat_call(fn, module, *args, remat: bool = True, params=None):
  """``fn(module, *args)`` under :func:`late_remat` (or, with ``remat=False``, as is);
  the module's non-parameter state (RNG counts, batch statistics) is updated as if
  called directly. ``module`` may be a tuple of modules (or ``None`` entries): only
  their parameters are inputs. ``params(names, array)`` maps each parameter before use
  (e.g. :func:`gather_param`; names as ``stacking.key_names``), on a copy of the
  module."""
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    # A copy: the call must not move the RNG counts held in ``state``, which are also
    # the saved inputs of the recomputation.
    module = nnx.merge(graphdef, state, copy=True)
    if params is not None:
      nnx.update(module, map_params(params, nnx.state(module, nnx.Param)))
    out = fn(module, *args)
    return out, nnx.state(module, nnx.Not(nnx.Param))

  out, rest = (late_remat(pure) if remat else pure)(state, *args)
  nnx.update(module, rest)
  return out


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

  def __init__(self, rate: float, *, rngs: nnx.Rngs | None, deterministic: bool = False,
               always_stream: bool = False):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
    self.rate = rate
    self.deterministic = deterministic
    # Like nnx.Dropout: a forked "dropout" stream, so each block draws its own masks.
    if rngs is not None and rate > 0:
      self.rngs = rngs["dropout"].fork()
    elif always_stream and rngs is not None:
      # A stream that is never needed at rate 0, so that all blocks of a scanned level
      # hold the same state; its own key, so the other blocks' streams stay as they were.
      self.rngs = nnx.RngStream(jax.random.key(0), tag=rngs["dropout"].tag)
    else:
      self.rngs = nnx.data(None)

  def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """``keep`` (a traced keep probability, in the default float dtype) replaces
    ``1 - rate``: the blocks of a scanned level share one module definition and take
    their rates as data. Both ways draw the same masks."""
    if self.deterministic:
      return x
    if keep is None:
      if self.rate == 0.0:
        return x
      keep = 1.0 - self.rate
    if self.rngs is None:
      raise ValueError("DropPath with a positive rate needs rngs in training mode")
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.rngs(), keep, shape)
    return jnp.where(mask, x / jnp.asarray(keep).astype(x.dtype), jnp.zeros_like(x))


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
