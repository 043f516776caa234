"""Rematerialisation that holds on XLA:CPU too: a call's or a scan step's recomputation
happens in the backward pass, not next to the forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.dcnv3.reference import never


def _is_float(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def late_remat(fn):
  """``jax.checkpoint(fn)`` (only the inputs are kept for the backward pass) whose
  recomputation cannot start before the output's cotangent exists. Plain
  ``jax.checkpoint`` lets XLA (on CPU at least) schedule recomputations early, all alive
  together, and the saving is lost."""

  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    # The small inputs (parameters) pass through a select on the largest (the
    # activation), so that nothing computed from parameters alone (a broadcast norm
    # scale) is hoisted to the start of the program and kept alive until this call.
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
    # XLA:CPU drops optimization barriers before CSE, which would merge the
    # recomputation back into the forward pass. A select on an always-false predicate
    # of the cotangent makes the recomputation's inputs new values, later in time.
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


def scan_remat(f, x: jax.Array, xs):
  """``jax.lax.scan(f, x, xs)`` keeping only each step's input carry for the backward
  pass, which recomputes one step at a time. ``f(x, xs_i) -> (x, ys_i)``; gradients
  flow to ``x`` and the floating-point leaves of ``xs``, not to the ``ys`` (RNG counts).
  Unlike ``scan(checkpoint(f))``, whose residual stacks XLA:CPU allocates at the start
  of the program, the stack of carries is made from the carry, so it exists only from
  the scan on."""
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
  """``fn(module, *args)`` under :func:`late_remat` (as is with ``remat=False``), the
  module's other state (RNG counts, batch statistics) updated as by a direct call.
  ``module`` may be a tuple of modules or ``None``; ``params(state) -> state`` maps the
  parameters before use (e.g. ``Placement.gather``), on a copy of the module."""
  graphdef, state = nnx.split(module)

  def pure(state, *args):
    # A copy: the call must not move the RNG counts held in ``state``, which are also
    # the saved inputs of the recomputation.
    module = nnx.merge(graphdef, state, copy=True)
    if params is not None:
      nnx.update(module, params(nnx.state(module, nnx.Param)))
    out = fn(module, *args)
    return out, nnx.state(module, nnx.Not(nnx.Param))

  out, rest = (late_remat(pure) if remat else pure)(state, *args)
  nnx.update(module, rest)
  return out
