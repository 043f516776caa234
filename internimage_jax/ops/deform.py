"""Deformable convolution v1 / v2 (``torchvision.ops.deform_conv2d`` semantics), NCHW.

The operator is computed as an im2col at deformed positions followed by one grouped
matmul with the weight:

1. For every output pixel, kernel point and offset group, the sampling position is
   the regular grid position plus the learned ``(dy, dx)``. Each position is
   bilinearly interpolated from the input (zero outside the image), scaled by the
   mask (DCNv2), and written into a column tensor ``[N, Ho*Wo, P, C_in]``.
2. ``out[n, o, l] = sum_{p, c} weight[o, c, p] * columns[n, l, p, c]`` per group.

Sampling gathers whole channel rows: the input is viewed channels-last as a table of
``N*H*W*offset_groups`` rows of ``C_in / offset_groups`` channels, so each bilinear
corner of each sampling point is one row index.

Memory and speed. Sampling and matmul have one VJP of their own: the columns
(``N*Ho*Wo*P*C_in``, in the matmul dtype) are kept for the weight gradient, as in
the original im2col implementations, but never the four column-sized corner
gathers, and the backward pass loops over the corners so that one corner's gather
and scatter update exist at a time. Reverse mode only (``jax.grad``, ``jax.vjp``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.dcnv3.params import IntOrPair, pair
from pallas_kernels.dcnv3.reference import Corner, bilinear_corners, compute_dtype


def _check_float(name: str, array: jax.Array) -> None:
  if not jnp.issubdtype(array.dtype, jnp.floating):
    raise TypeError(f"deform_conv2d: {name} must be floating point, got {array.dtype}")


def _corners(py: jax.Array, px: jax.Array, *, height: int, width: int,
             offset_groups: int) -> list[Corner]:
  """The four bilinear corners of every sampling point (arrays ``[N, Ho, Wo, P, OG]``),
  rows of the ``[N*H*W*OG, Cg]`` table: DCNv3's corners (``bilinear_corners``) with
  torchvision's rule on top. A point is sampled when ``-1 < y < H`` and ``-1 < x < W``;
  each of its four corners contributes only if it lies in the image. A NaN position
  (a NaN offset) gives NaN weights, so it propagates to the output and the gradients
  as in ``dcnv3``, instead of counting as a point outside the image."""
  n = py.shape[0]
  valid = (py > -1) & (py < height) & (px > -1) & (px < width)
  return bilinear_corners(
      px, py, batch=jnp.arange(n, dtype=jnp.int32).reshape(n, 1, 1, 1, 1),
      group_index=jnp.arange(offset_groups, dtype=jnp.int32), group=offset_groups,
      height=height, width=width, valid=valid, propagate_nan=True)


def _stacked(corners: list[Corner]) -> Corner:
  """The corners stacked for a scan over them, without ``inside`` (the weights hold it)."""
  return jax.tree.map(lambda *a: jnp.stack(a), *(c._replace(inside=None) for c in corners))


def _sample(table: jax.Array, corners: list[Corner], mask: jax.Array, dtype) -> jax.Array:
  """The columns ``[N, Ho, Wo, P, OG, Cg]``: the four weighted corner gathers summed
  elementwise (XLA fuses them into one pass)."""
  out = None
  for corner in corners:
    term = table[corner.index].astype(dtype) * (corner.weight * mask)[..., None]
    out = term if out is None else out + term
  return out


def _sample_materialised(table: jax.Array, corners: list[Corner], mask: jax.Array,
                         dtype) -> jax.Array:
  """:func:`_sample` as a loop over the corners, whose result XLA cannot fuse into
  its readers. When the columns have two readers (the forward matmul and the weight
  gradient), XLA fuses the plain corner sum into both and keeps the four corner
  gathers for them: twice the time and four extra column-sized buffers."""
  stacked = _stacked(corners)

  def corner_step(cols, corner):
    return cols + table[corner.index].astype(dtype) * (corner.weight * mask)[..., None], None

  cols = jnp.zeros(mask.shape + (table.shape[1],), dtype)
  return jax.lax.scan(corner_step, cols, stacked)[0]


def _sample_vjp(table: jax.Array, corners: list[Corner], mask: jax.Array, g: jax.Array,
                dtype) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Gradients of :func:`_sample` for the columns' gradient ``g``: input table,
  positions ``(y, x)`` and mask.

  A loop over the corners, so that one corner's column-sized gather and scatter
  update exist at a time. Per corner, the gather is contracted with ``g`` over
  channels in an einsum (XLA:CPU runs multiply-then-reduce of a gather ~8x slower),
  which gives the gradient of the corner's weight, hence of positions and mask; one
  scatter-add sends the weighted gradient to the input.
  """
  stacked = _stacked(corners)

  def corner_step(carry, corner):
    dtable, dpy, dpx, dmask = carry
    dot = jnp.einsum("...c,...c->...", table[corner.index].astype(dtype), g,
                     precision=jax.lax.Precision.HIGHEST)
    dtable = dtable.at[corner.index].add(g * (corner.weight * mask)[..., None])
    return (dtable, dpy + dot * corner.dweight_dy, dpx + dot * corner.dweight_dx,
            dmask + dot * corner.weight), None

  zeros = jnp.zeros_like(mask)
  (dtable, dpy, dpx, dmask), _ = jax.lax.scan(
      corner_step, (jnp.zeros(table.shape, dtype), zeros, zeros, zeros), stacked)
  return dtable.astype(table.dtype), dpy * mask, dpx * mask, dmask


@functools.lru_cache(maxsize=None)
def _deformable_matmul(height: int, width: int, offset_groups: int, dtype: jnp.dtype):
  """``out[n, l, g, o] = sum_{p, c} weight[g, o, c, p] * cols[n, l, p, g, c]`` where
  ``cols = _sample(...)``, as one function with its own VJP.

  The columns are computed once and kept (in the matmul dtype) for the weight
  gradient; the corner gathers are never kept.
  """
  kw = dict(height=height, width=width, offset_groups=offset_groups)

  def columns(table, py, px, mask, weight, sample=_sample):
    n, ho, wo, points, _ = py.shape
    groups, _, c_per_group, _ = weight.shape
    cols = sample(table, _corners(py, px, **kw), mask, dtype)
    return cols.astype(weight.dtype).reshape(n, ho * wo, points, groups, c_per_group)

  def matmul(cols, weight):
    return jnp.einsum("nlpgc,gocp->nlgo", cols, weight, preferred_element_type=dtype)

  @jax.custom_vjp
  def op(table, py, px, mask, weight):
    return matmul(columns(table, py, px, mask, weight), weight)

  def op_fwd(table, py, px, mask, weight):
    # Training: the columns have a second reader, the weight gradient.
    cols = columns(table, py, px, mask, weight, _sample_materialised)
    return matmul(cols, weight), (table, py, px, mask, weight, cols)

  def op_bwd(residuals, g):
    table, py, px, mask, weight, cols = residuals
    g = g.astype(weight.dtype)
    dweight = jnp.einsum("nlpgc,nlgo->gocp", cols, g, preferred_element_type=dtype)
    dcols = jnp.einsum("nlgo,gocp->nlpgc", g, weight, preferred_element_type=dtype)
    dcols = dcols.reshape(py.shape + (table.shape[1],))
    dtable, dpy, dpx, dmask = _sample_vjp(table, _corners(py, px, **kw), mask, dcols, dtype)
    return dtable, dpy, dpx, dmask, dweight.astype(weight.dtype)

  op.defvjp(op_fwd, op_bwd)
  return op


def deform_conv2d(
    input: jax.Array,  # noqa: A002 - torchvision's argument name
    offset: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    mask: jax.Array | None = None,
    *,
    layout: str = "NCHW",
) -> jax.Array:
  """Deformable convolution: DCNv1, or DCNv2 when ``mask`` is given (torchvision API).

  ``layout="NHWC"`` takes ``input``, ``offset`` and ``mask`` channels-last (same
  channel order) and returns ``[N, Ho, Wo, C_out]``; ``weight`` keeps its layout.

  Args:
    input: ``[N, C_in, H, W]``.
    offset: ``[N, 2 * offset_groups * kh * kw, Ho, Wo]``: for offset group ``g`` and
      kernel point ``p = ky * kw + kx``, channels ``2 * (g * kh * kw + p)`` and
      ``+ 1`` hold ``(dy, dx)``. ``offset_groups`` is inferred and must divide C_in.
    weight: ``[C_out, C_in / groups, kh, kw]``; ``groups`` is inferred from it.
    bias: ``[C_out]`` or None.
    stride, padding, dilation: ints or ``(h, w)`` pairs.
    mask: ``[N, offset_groups * kh * kw, Ho, Wo]`` modulation (DCNv2) or None.

  Returns:
    ``[N, C_out, Ho, Wo]`` in the dtype of ``input``. Sampling and accumulation are
    float32 for float32 and narrower inputs (bfloat16 columns feed the matmul, as
    a bfloat16 convolution would), float64 for float64. Differentiable in reverse
    mode (``jax.grad`` / ``jax.vjp``) with respect to every array argument.
  """
  stride, padding, dilation = (
      pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"))
  if min(*stride, *dilation) < 1 or min(padding) < 0:
    raise ValueError(f"deform_conv2d: stride and dilation must be >= 1 and padding >= 0, got "
                     f"stride={stride}, dilation={dilation}, padding={padding}")
  if layout not in ("NCHW", "NHWC"):
    raise ValueError(f"deform_conv2d: layout must be 'NCHW' or 'NHWC', got {layout!r}")
  if layout == "NHWC":
    input, offset = (jnp.moveaxis(jnp.asarray(a), -1, 1) for a in (input, offset))
    mask = None if mask is None else jnp.moveaxis(jnp.asarray(mask), -1, 1)
  out = _deform_conv2d(input, offset, weight, bias, mask, stride=stride, padding=padding,
                       dilation=dilation)
  return jnp.moveaxis(out, 1, -1) if layout == "NHWC" else out


@functools.partial(jax.jit, static_argnames=("stride", "padding", "dilation"))
def _deform_conv2d(input: jax.Array, offset: jax.Array, weight: jax.Array,  # noqa: A002
                   bias: jax.Array | None, mask: jax.Array | None, *, stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int]) -> jax.Array:
  (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
  for name, array in (("input", input), ("offset", offset), ("weight", weight), ("mask", mask)):
    if array is None:
      continue
    if array.ndim != 4:
      raise ValueError(f"deform_conv2d: {name} must be rank 4, got shape {tuple(array.shape)}")
    _check_float(name, array)
  n, c_in, h, w = input.shape
  c_out, c_per_group, kh, kw = weight.shape
  if c_per_group < 1 or c_in % c_per_group:
    raise ValueError(f"deform_conv2d: weight expects {c_per_group} input channels per group, "
                     f"which does not divide the input's {c_in} channels")
  groups = c_in // c_per_group
  if c_out % groups:
    raise ValueError(f"deform_conv2d: weight's {c_out} output channels are not divisible by "
                     f"groups={groups} (input channels {c_in} / weight.shape[1] {c_per_group})")
  if bias is not None and tuple(bias.shape) != (c_out,):
    raise ValueError(f"deform_conv2d: bias must have shape ({c_out},), got {tuple(bias.shape)}")
  ho = (h + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
  wo = (w + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
  if ho < 1 or wo < 1:
    raise ValueError(f"deform_conv2d: input {h}x{w} is too small for kernel {kh}x{kw}, "
                     f"dilation {(dh, dw)} and padding {(ph, pw)}")
  points = kh * kw
  if offset.shape[1] % (2 * points) or offset.shape[1] == 0:
    raise ValueError(f"deform_conv2d: offset must have 2 * offset_groups * {kh} * {kw} "
                     f"channels, got {offset.shape[1]}")
  og = offset.shape[1] // (2 * points)
  if c_in % og:
    raise ValueError(f"deform_conv2d: input channels ({c_in}) must be divisible by "
                     f"offset_groups ({og}, from offset's {offset.shape[1]} channels)")
  if tuple(offset.shape) != (n, 2 * og * points, ho, wo):
    raise ValueError(f"deform_conv2d: offset must have shape {(n, 2 * og * points, ho, wo)} "
                     f"(N, 2*offset_groups*kh*kw, Ho, Wo), got {tuple(offset.shape)}")
  if mask is not None and tuple(mask.shape) != (n, og * points, ho, wo):
    raise ValueError(f"deform_conv2d: mask must have shape {(n, og * points, ho, wo)} "
                     f"(N, offset_groups*kh*kw, Ho, Wo), got {tuple(mask.shape)}")

  cdt = compute_dtype(input.dtype)
  # Positions [N, Ho, Wo, P, OG]: regular grid plus learned (dy, dx).
  off = offset.astype(cdt).reshape(n, og, points, 2, ho, wo).transpose(0, 4, 5, 2, 1, 3)
  ky, kx = jnp.divmod(jnp.arange(points), kw)
  grid_y = (jnp.arange(ho) * sh - ph)[:, None] + (ky * dh)[None, :]  # [Ho, P]
  grid_x = (jnp.arange(wo) * sw - pw)[:, None] + (kx * dw)[None, :]  # [Wo, P]
  py = grid_y.astype(cdt)[None, :, None, :, None] + off[..., 0]
  px = grid_x.astype(cdt)[None, None, :, :, None] + off[..., 1]
  m = None
  if mask is not None:
    m = mask.astype(cdt).reshape(n, og, points, ho, wo).transpose(0, 3, 4, 2, 1)

  # Rows of (n, y, x, offset group): a free reshape of the channels-last input.
  table = input.transpose(0, 2, 3, 1).reshape(n * h * w * og, c_in // og)
  if m is None:  # DCNv1: a unit mask (its gradient is dropped)
    m = jnp.ones_like(py)
  # bfloat16 inputs: bfloat16 columns into a matmul accumulating in float32.
  mm_dtype = input.dtype if jnp.finfo(input.dtype).bits < 32 else cdt
  wt = weight.astype(mm_dtype).reshape(groups, c_out // groups, c_per_group, points)
  out = _deformable_matmul(h, w, og, jnp.dtype(cdt))(table, py, px, m, wt)  # [N, L, G, O/G]
  out = out.reshape(n, ho, wo, c_out)
  if bias is not None:
    out = out + bias.astype(cdt)
  return out.transpose(0, 3, 1, 2).astype(input.dtype)
