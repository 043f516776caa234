"""Pure-JAX DCNv3 sampling: the XLA fallback and the reference for the kernels.

The operator is a bilinear gather. Channels-last input ``[N, H, W, G*C]`` is viewed
as one table per image of ``H*W*G`` rows of ``C`` channels (a free reshape), so every
bilinear corner of every sampling point is one row index into its own image's table.
The gathers and scatters are batched over images (``vmap``: the batch is an operand
batching dimension, not part of the row index), which lets XLA's SPMD partitioner
split them over a batch-sharded mesh; a row index into a flat ``[N*H*W*G, C]`` table
would make it all-gather the whole table and all-reduce its gradient on every device.

Memory. Autodiff through the gather would keep the gathered corners (``4 * P``
input-sized copies, 36x for a 3x3 kernel) alive until the backward pass. The
custom VJP below keeps only the inputs and recomputes indices and weights in the
backward pass.

Speed (XLA:CPU). The batch is cut into chunks of whole images (``lax.map``) small
enough that the gathered table stays in cache, and within a chunk both passes loop
over the P sampling points. XLA:CPU fuses a gather into elementwise consumers but
not into reductions, so the forward sums the four weighted corner gathers of one
point elementwise into the output, and the backward, per point, gathers the four
corners once, contracts them with the output gradient, and scatters the four
weighted copies of the output gradient in a single scatter that reuses the
gather's row indices.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.dcnv3.params import DCNv3Params

# (dy, dx) of the four bilinear neighbours of floor(py), floor(px).
_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))


class Corner(NamedTuple):
  """One bilinear neighbour of a set of sampling points (arrays of their shape)."""

  index: jax.Array  # row of the table (clamped in range)
  inside: jax.Array  # whether the neighbour counts: in the image (and its point ``valid``)
  weight: jax.Array  # bilinear weight, zero where the neighbour does not count
  dweight_dx: jax.Array  # d weight / d px
  dweight_dy: jax.Array  # d weight / d py


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """float32 for float32 and narrower inputs, float64 for float64."""
  return jnp.promote_types(dtype, jnp.float32)


def output_centres(params: DCNv3Params, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
  """Unpadded input coordinates of each output pixel's centre point: ``[Wo]``, ``[Ho]``."""
  (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
      params.kernel, params.stride, params.pad, params.dilation)
  centre_x = np.arange(out_w) * sw + (dw * (kw - 1)) // 2 - pw
  centre_y = np.arange(out_h) * sh + (dh * (kh - 1)) // 2 - ph
  return centre_x, centre_y


def _point_positions(
    offset: jax.Array, point: jax.Array, params: DCNv3Params, dtype: jnp.dtype,
    row_start: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array]:
  """``(px, py)`` of one (traced) point index, each ``[N, Ho, Wo, G]``; ``offset``
  holds output rows ``row_start ...``."""
  n, ho, wo, _ = offset.shape
  g, s = params.group, params.offset_scale
  off = offset.reshape(n, ho, wo, g, params.num_points, 2)
  off = jax.lax.dynamic_index_in_dim(off, point, axis=4, keepdims=False).astype(dtype)
  grid = jnp.asarray(params.kernel_grid(), dtype=dtype)[point]  # (dx, dy)
  centre_x, centre_y = output_centres(params, ho, wo)
  centre_y = jnp.asarray(centre_y[:, None, None], dtype)
  if not (isinstance(row_start, int) and row_start == 0):
    centre_y = centre_y + (row_start * params.stride[0]).astype(dtype)
  px = jnp.asarray(centre_x[:, None], dtype) + s * grid[0] + s * off[..., 0]
  py = centre_y + s * grid[1] + s * off[..., 1]
  return px, py


def bilinear_corners(
    px: jax.Array, py: jax.Array, *, batch: jax.Array, group_index: jax.Array, group: int,
    height: int, width: int, valid: jax.Array | None = None, propagate_nan: bool = False,
) -> list[Corner]:
  """Row indices, weights and weight derivatives of the four bilinear corners.

  ``batch`` and ``group_index`` (ints broadcastable to ``px``) say whose points they
  are; rows index the ``[N*H*W*G, C]`` table. The one home of the bilinear rule:
  shared by the XLA fallback and the Pallas kernels, so both sample exactly the same
  way, and by ``internimage_jax.ops.deform_conv2d`` (torchvision's rule), which adds:

  * ``valid``: points sampled at all (torchvision: ``-1 < y < H`` and ``-1 < x < W``);
    a corner counts only if it lies in the image and its point is valid.
  * ``propagate_nan``: a NaN position gets NaN weights and derivatives (in place of
    zeros when its corners do not count), so that it reaches the output and the
    gradients as in DCNv3 instead of counting as a point outside the image.
  """
  if propagate_nan:
    unknown = jnp.isnan(px) | jnp.isnan(py)
    nan = jnp.where(unknown, jnp.nan, 0).astype(px.dtype)  # NaN position derivatives too
  x0, y0 = jnp.floor(px), jnp.floor(py)
  lx, ly = px - x0, py - y0
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  corners = []
  for dy, dx in _CORNERS:
    yy, xx = y0i + dy, x0i + dx
    inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
    if valid is not None:
      inside = valid & inside
    wy = ly if dy else 1 - ly
    wx = lx if dx else 1 - lx
    dwx = wy if dx else -wy
    dwy = wx if dy else -wx
    counts = inside
    if propagate_nan:
      counts = inside | unknown
      dwx, dwy = dwx + nan, dwy + nan
    zero = jnp.zeros_like(wy)
    row = ((batch * height + jnp.clip(yy, 0, height - 1)) * width
           + jnp.clip(xx, 0, width - 1)) * group + group_index
    corners.append(Corner(
        index=row,
        inside=inside,
        weight=jnp.where(counts, wy * wx, zero),
        dweight_dx=jnp.where(counts, dwx, zero),
        dweight_dy=jnp.where(counts, dwy, zero),
    ))
  return corners


def _table_corners(px: jax.Array, py: jax.Array, group: int, height: int, width: int
                   ) -> list[Corner]:
  """``bilinear_corners`` for ``[N, Ho, Wo, G]`` positions: rows of each image's table."""
  return bilinear_corners(
      px, py, batch=0, group_index=jnp.arange(group, dtype=jnp.int32), group=group,
      height=height, width=width)


def _as_table(x: jax.Array, group: int) -> jax.Array:
  """``[N, H, W, G*C]`` -> per-image tables ``[N, H*W*G, C]``."""
  n, h, w, gc = x.shape
  return x.reshape(n, h * w * group, gc // group)


def _gather(table: jax.Array, index: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Rows ``index[n, ...]`` of image ``n``'s table, for every image."""
  # Indices are clamped in range by construction; "promise_in_bounds" lets XLA drop
  # its own bounds handling from the fused gather.
  return jax.vmap(lambda t, i: t.at[i].get(mode="promise_in_bounds"))(table, index).astype(dtype)


def _scatter_add(table: jax.Array, index: jax.Array, updates: jax.Array) -> jax.Array:
  """Adds ``updates[n, ...]`` to rows ``index[n, ...]`` of image ``n``'s table."""
  return jax.vmap(lambda t, i, u: t.at[i].add(u, mode="promise_in_bounds"))(
      table, index, updates)


# Rows gathered per corner per loop step that keep the working set cache-sized: the
# batch is processed in chunks of whole images holding about this many output
# pixel-groups (one image of InternImage-T level 0 at 224 px; all 8 at level 3).
_CHUNK_ROWS = 16384


def images_per_chunk(batch: int, out_h: int, out_w: int, group: int) -> int:
  """The largest divisor of ``batch`` whose images hold at most ``_CHUNK_ROWS`` rows.

  Chunking is a cache optimisation for a single CPU device. With several devices the
  batch is sharded, and a sequential map over batch chunks would make XLA gather
  each chunk from the devices holding it; accelerators want the whole batch at once.
  """
  if (jax.default_backend() != "cpu" or jax.device_count() > 1
      or not isinstance(batch, int)):  # a symbolic batch (jax.export) has no divisors
    return batch
  limit = max(1, _CHUNK_ROWS // (out_h * out_w * group))
  return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= limit)


def _over_image_chunks(fn, arrays: tuple[jax.Array, ...], params: DCNv3Params):
  """Applies ``fn`` to chunks of whole images (``lax.map``) and restacks the results."""
  n, ho, wo, _ = arrays[1].shape  # offset
  ip = images_per_chunk(n, ho, wo, params.group)
  if ip == n:
    return fn(*arrays)
  chunks = tuple(a.reshape(n // ip, ip, *a.shape[1:]) for a in arrays)
  out = jax.lax.map(lambda args: fn(*args), chunks)
  return jax.tree.map(lambda o: o.reshape(n, *o.shape[2:]), out)


@functools.partial(jax.jit, static_argnames=("params",))
def _forward(x: jax.Array, offset: jax.Array, mask: jax.Array, params: DCNv3Params) -> jax.Array:
  return _over_image_chunks(functools.partial(_forward_chunk, params=params), (x, offset, mask),
                            params)


# The backward pass gathers a point's four corners at once: two temporaries of 4x the
# input (gathered values, scattered gradients). Without image chunks (several devices,
# accelerators) and above this size, it runs over this many chunks of output rows.
_ROW_CHUNK_BYTES = 64 * 2**20
_ROW_CHUNKS = 4


def row_chunks(batch: int, out_h: int, out_w: int, channels: int, itemsize: int) -> int:
  """How many chunks of output rows the unchunked backward pass runs over."""
  if batch * out_h * out_w * channels * itemsize * 4 <= _ROW_CHUNK_BYTES:
    return 1
  return max(d for d in range(1, _ROW_CHUNKS + 1) if out_h % d == 0)


@functools.partial(jax.jit, static_argnames=("params",))
def _backward(
    x: jax.Array, offset: jax.Array, mask: jax.Array, grad_out: jax.Array, params: DCNv3Params
) -> tuple[jax.Array, jax.Array, jax.Array]:
  n, ho, wo, _ = offset.shape
  if images_per_chunk(n, ho, wo, params.group) < n:
    return _over_image_chunks(functools.partial(_backward_chunk, params=params),
                              (x, offset, mask, grad_out), params)
  k = row_chunks(n, ho, wo, x.shape[-1], jnp.dtype(compute_dtype(x.dtype)).itemsize)
  if k == 1:
    return _backward_chunk(x, offset, mask, grad_out, params)
  # Chunks of output rows (the batch axis, which may be sharded, stays whole), sliced
  # and written back in place: the gradients accumulate in buffers made up front.
  rows = ho // k

  def body(i, carry):
    grad_table, grad_offset, grad_mask = carry
    start = i * rows
    chunk = [jax.lax.dynamic_slice_in_dim(a, start, rows, axis=1)
             for a in (offset, mask, grad_out)]
    grad_table, g_offset, g_mask = _backward_chunk(
        x, *chunk, params, row_start=start, grad_table=grad_table)
    return (grad_table,
            jax.lax.dynamic_update_slice_in_dim(grad_offset, g_offset, start, axis=1),
            jax.lax.dynamic_update_slice_in_dim(grad_mask, g_mask, start, axis=1))

  grad_table, grad_offset, grad_mask = jax.lax.fori_loop(0, k, body, (
      _zero_table(x, params.group, grad_out), _zeros(offset.shape, offset.dtype, grad_out),
      _zeros(mask.shape, mask.dtype, grad_out)))
  return grad_table.reshape(x.shape).astype(x.dtype), grad_offset, grad_mask


def _zeros(shape: tuple[int, ...], dtype, after: jax.Array) -> jax.Array:
  """Zeros that XLA can neither hoist nor share between calls.

  Constant zeros depend on nothing: XLA:CPU schedules such buffers early and merges
  equal ones, so an accumulator would live from the start of a (rematerialised)
  block, or from one call to the next. These depend, through a predicate that is
  always false, on one element of ``after``.
  """
  return jnp.broadcast_to(jnp.where(never(after), 1, 0).astype(dtype), shape)


def never(*xs: jax.Array) -> jax.Array:
  """A boolean that is always false but that XLA cannot fold: it depends on one
  element of each of ``xs`` (any of which may be a constant, e.g. a zero cotangent)."""
  scalar = sum(x.reshape(-1)[0].astype(jnp.float32) for x in xs)
  return jnp.isnan(scalar) & (scalar == scalar)  # (``abs(s) < 0`` gets folded)


def _zero_table(x: jax.Array, group: int, after: jax.Array) -> jax.Array:
  n, h, w, gc = x.shape
  return _zeros((n, h * w * group, gc // group), compute_dtype(x.dtype), after)


def _forward_chunk(x: jax.Array, offset: jax.Array, mask: jax.Array, params: DCNv3Params
                   ) -> jax.Array:
  n, h, w, gc = x.shape
  g, p = params.group, params.num_points
  _, ho, wo, _ = offset.shape
  cdt = compute_dtype(x.dtype)
  table = _as_table(x, g)
  m = mask.reshape(n, ho, wo, g, p)

  def accumulate(point, out):
    px, py = _point_positions(offset, point, params, cdt)
    m_p = jax.lax.dynamic_index_in_dim(m, point, axis=4, keepdims=False).astype(cdt)
    for corner in _table_corners(px, py, g, h, w):
      out = out + _gather(table, corner.index, cdt) * (m_p * corner.weight)[..., None]
    return out

  out = jax.lax.fori_loop(0, p, accumulate, _zeros((n, ho, wo, g, gc // g), cdt, offset))
  return out.reshape(n, ho, wo, gc).astype(x.dtype)


def _backward_chunk(
    x: jax.Array, offset: jax.Array, mask: jax.Array, grad_out: jax.Array, params: DCNv3Params,
    row_start: jax.Array | int = 0, grad_table: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients of a chunk of images, or with ``row_start``, of a chunk of output rows;
  with ``grad_table`` it accumulates the input gradient there and returns that table
  (compute dtype) in place of the input gradient."""
  n, h, w, gc = x.shape
  g, p = params.group, params.num_points
  c = gc // g
  _, ho, wo, _ = offset.shape
  cdt = compute_dtype(x.dtype)
  table = _as_table(x, g)
  m = mask.reshape(n, ho, wo, g, p)
  gout = grad_out.astype(cdt).reshape(n, ho, wo, g, c)

  def accumulate(point, carry):
    grad_table, grad_pos, grad_mask = carry
    px, py = _point_positions(offset, point, params, cdt, row_start)
    m_p = jax.lax.dynamic_index_in_dim(m, point, axis=4, keepdims=False).astype(cdt)
    corners = _table_corners(px, py, g, h, w)
    rows = jnp.stack([k.index for k in corners], -1)  # [N, Ho, Wo, G, 4]
    # <corner value, grad_out> for the four corners at once.
    corner_values = _gather(table, rows, cdt)
    dots = jnp.einsum("...kc,...c->...k", corner_values, gout)
    # Sums over the four corners written out: XLA:CPU runs a small reduction far
    # slower than the equivalent elementwise fusion.
    g_mask = sum(k.weight * dots[..., i] for i, k in enumerate(corners))
    g_x = sum(k.dweight_dx * dots[..., i] for i, k in enumerate(corners))
    g_y = sum(k.dweight_dy * dots[..., i] for i, k in enumerate(corners))
    grad_mask = jax.lax.dynamic_update_index_in_dim(grad_mask, g_mask, point, axis=0)
    grad_pos = jax.lax.dynamic_update_index_in_dim(
        grad_pos, jnp.stack([m_p * g_x, m_p * g_y]), point, axis=0)
    # One scatter for the four corners (it shares the row indices with the gather).
    weights = jnp.stack([m_p * k.weight for k in corners], -1)
    grad_table = _scatter_add(grad_table, rows, weights[..., None] * gout[..., None, :])
    return grad_table, grad_pos, grad_mask

  # Point-major gradient buffers: each point writes one contiguous slab.
  accumulated = grad_table is not None
  grad_table, grad_pos, grad_mask = jax.lax.fori_loop(0, p, accumulate, (
      grad_table if accumulated else _zero_table(x, g, grad_out),
      _zeros((p, 2, n, ho, wo, g), cdt, grad_out),
      _zeros((p, n, ho, wo, g), cdt, grad_out),
  ))
  grad_pos = jnp.moveaxis(grad_pos, (0, 1), (-2, -1))
  grad_mask = jnp.moveaxis(grad_mask, 0, -1)
  # d position / d offset = offset_scale.
  grad_offset = params.offset_scale * grad_pos
  return (
      grad_table if accumulated else grad_table.reshape(x.shape).astype(x.dtype),
      grad_offset.reshape(offset.shape).astype(offset.dtype),
      grad_mask.reshape(mask.shape).astype(mask.dtype),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def dcnv3_xla(x: jax.Array, offset: jax.Array, mask: jax.Array, params: DCNv3Params) -> jax.Array:
  """The DCNv3 sampling operator in plain XLA ops (shapes already validated)."""
  return _forward(x, offset, mask, params)


def _dcnv3_xla_fwd(x, offset, mask, params):
  return _forward(x, offset, mask, params), (x, offset, mask)


def _dcnv3_xla_bwd(params, residuals, grad_out):
  return _backward(*residuals, grad_out, params)


dcnv3_xla.defvjp(_dcnv3_xla_fwd, _dcnv3_xla_bwd)
