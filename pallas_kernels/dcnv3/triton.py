"""DCNv3 sampling as Pallas Triton (GPU) kernels, forward and backward.

Layout. With free reshapes the operands become row tables: ``x`` ``[N*H*W*G, C]``
(one row per input pixel-group), ``offset`` ``[Q, P*2]``, ``mask`` ``[Q, P]`` and the
output ``[Q, C]`` with ``Q = N*Ho*Wo*G`` output pixel-groups. A program owns
``block_q`` consecutive output pixel-groups and all ``C`` channels of each.

Forward. For each of the P points (unrolled) the program computes the sampling
position of its ``block_q`` rows, and gathers the four bilinear corners as masked
``[block_q, C]`` loads (one 64/128-byte row per corner for C = 16/32 in float32),
accumulating ``mask * weight * value`` in float32 registers; one store at the end.

Backward. The same walk recomputes positions and corners, loads the output
gradient once, and per point and corner forms ``<value, grad_out>`` in registers:
the mask and offset gradients need no atomics (each program owns its rows). The
input gradient is a scatter: ``atomic_add`` of ``mask * weight * grad_out`` into a
float32 buffer, outside-image corners contributing zero at a clamped row.

Channels that are not a power of two are padded by the wrapper; float32 and
bfloat16 inputs accumulate in float32 (float64 on GPU too, for tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dcnv3.config import TritonConfig
from pallas_kernels.dcnv3.params import DCNv3Params
from pallas_kernels.dcnv3.reference import Corner, bilinear_corners, compute_dtype


class _Geometry:
  """Static sizes a kernel needs, kept as Python ints/floats."""

  def __init__(self, params: DCNv3Params, n: int, h: int, w: int, channels: int):
    self.params = params
    self.n, self.h, self.w = n, h, w
    self.g = params.group
    self.c = channels // params.group
    self.cp = max(16, int(pl.next_power_of_2(self.c)))  # Triton blocks: powers of two
    self.ho, self.wo = params.output_size(h, w)
    self.p = params.num_points
    self.q = n * self.ho * self.wo * self.g
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        params.kernel, params.stride, params.pad, params.dilation)
    self.sh, self.sw = sh, sw
    self.base_x = (dw * (kw - 1)) // 2 - pw
    self.base_y = (dh * (kh - 1)) // 2 - ph


# Official models use 3x3 kernels (9 points): the loop over points is unrolled. Larger
# kernels loop instead: Triton's compile time grows steeply with the unrolled body
# (a 5x5 kernel's backward did not compile within 100 s on an H100).
_MAX_UNROLLED_POINTS = 9


def _for_each_point(geo: _Geometry, body, carry):
  """``carry = body(p, carry)`` over the points: unrolled (static ``p``) or a loop."""
  if geo.p <= _MAX_UNROLLED_POINTS:
    for p in range(geo.p):
      carry = body(p, carry)
    return carry
  return jax.lax.fori_loop(0, geo.p, body, carry)


def _query_centres(q, geo: _Geometry, dtype):
  """Output pixel-group ``q`` -> (batch, group, centre x, centre y).

  Lanes past the last pixel-group (the tail of the last block) are mapped onto it,
  so that everything they address stays in bounds; their loads and stores are masked.
  """
  q = jnp.minimum(q, geo.q - 1)
  g = q % geo.g
  t = q // geo.g
  j = t % geo.wo
  t = t // geo.wo
  i = t % geo.ho
  n = t // geo.ho
  cx = (j * geo.sw + geo.base_x).astype(dtype)
  cy = (i * geo.sh + geo.base_y).astype(dtype)
  return n, g, cx, cy


def _corners(px, py, n, g, geo: _Geometry) -> list[Corner]:
  """The four bilinear corners of the lanes' points (rows clamped in bounds)."""
  return bilinear_corners(px, py, batch=n, group_index=g, group=geo.g, height=geo.h,
                          width=geo.w)


def _positions(off_ref, q, live, p, cx, cy, geo: _Geometry, dtype):
  s = geo.params.offset_scale
  gx, gy = geo.params.grid_offset(p)  # static p, or traced inside a loop
  ox = plgpu.load(off_ref.at[q, 2 * p], mask=live, other=0.0).astype(dtype)
  oy = plgpu.load(off_ref.at[q, 2 * p + 1], mask=live, other=0.0).astype(dtype)
  return (cx + s * jnp.asarray(gx, dtype) + s * ox, cy + s * jnp.asarray(gy, dtype) + s * oy)


def _forward_kernel(x_ref, off_ref, mask_ref, out_ref, *, geo: _Geometry, block_q: int, acc_dtype):
  q = pl.program_id(0) * block_q + jnp.arange(block_q)
  live = q < geo.q
  ch = jnp.arange(geo.cp)
  ch_live = ch < geo.c
  n, g, cx, cy = _query_centres(q, geo, acc_dtype)

  def point(p, acc):
    px, py = _positions(off_ref, q, live, p, cx, cy, geo, acc_dtype)
    m = plgpu.load(mask_ref.at[q, p], mask=live, other=0.0).astype(acc_dtype)
    for k in _corners(px, py, n, g, geo):
      value = plgpu.load(x_ref.at[k.index[:, None], ch[None, :]],
                         mask=(k.inside & live)[:, None] & ch_live[None, :], other=0.0)
      acc += (m * k.weight)[:, None] * value.astype(acc_dtype)
    return acc

  acc = _for_each_point(geo, point, jnp.zeros((block_q, geo.cp), acc_dtype))
  plgpu.store(out_ref.at[q[:, None], ch[None, :]], acc.astype(out_ref.dtype),
              mask=live[:, None] & ch_live[None, :])


def _backward_kernel(x_ref, off_ref, mask_ref, gout_ref, gx_init_ref,
                     goff_ref, gmask_ref, gx_ref, *, geo: _Geometry, block_q: int, acc_dtype):
  del gx_init_ref  # aliased to gx_ref: the zero-initialised accumulator
  q = pl.program_id(0) * block_q + jnp.arange(block_q)
  live = q < geo.q
  ch = jnp.arange(geo.cp)
  ch_live = ch < geo.c
  both = live[:, None] & ch_live[None, :]
  n, g, cx, cy = _query_centres(q, geo, acc_dtype)
  gout = plgpu.load(gout_ref.at[q[:, None], ch[None, :]], mask=both, other=0.0).astype(acc_dtype)
  s = geo.params.offset_scale

  def point(p, carry):
    px, py = _positions(off_ref, q, live, p, cx, cy, geo, acc_dtype)
    m = plgpu.load(mask_ref.at[q, p], mask=live, other=0.0).astype(acc_dtype)
    g_mask = g_x = g_y = jnp.zeros((block_q,), acc_dtype)
    for k in _corners(px, py, n, g, geo):
      value = plgpu.load(x_ref.at[k.index[:, None], ch[None, :]],
                         mask=(k.inside & live)[:, None] & ch_live[None, :], other=0.0)
      dot = jnp.sum(value.astype(acc_dtype) * gout, axis=1)
      g_mask += k.weight * dot
      g_x += k.dweight_dx * dot
      g_y += k.dweight_dy * dot
      # No mask on the atomic (interpret mode has none): dead lanes add zero.
      update = jnp.where(both & k.inside[:, None], (m * k.weight)[:, None] * gout, 0.0)
      plgpu.atomic_add(gx_ref, (k.index[:, None], ch[None, :]), update.astype(gx_ref.dtype))
    plgpu.store(gmask_ref.at[q, p], g_mask.astype(gmask_ref.dtype), mask=live)
    plgpu.store(goff_ref.at[q, 2 * p], (s * m * g_x).astype(goff_ref.dtype), mask=live)
    plgpu.store(goff_ref.at[q, 2 * p + 1], (s * m * g_y).astype(goff_ref.dtype), mask=live)
    return carry

  _for_each_point(geo, point, ())


def _table(x: jax.Array, geo: _Geometry) -> jax.Array:
  """``x`` as ``[N*H*W*G, Cp]`` rows, channels zero-padded to a power of two."""
  rows = x.reshape(-1, geo.g, geo.c)
  if geo.cp != geo.c:
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, geo.cp - geo.c)))
  return rows.reshape(-1, geo.cp)


def _untable(rows: jax.Array, geo: _Geometry, shape) -> jax.Array:
  return rows.reshape(-1, geo.g, geo.cp)[..., : geo.c].reshape(shape)


def _compiler_params(config: TritonConfig):
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret"))
def forward(x, offset, mask, *, params: DCNv3Params, config: TritonConfig, interpret: bool):
  n, h, w, channels = x.shape
  geo = _Geometry(params, n, h, w, channels)
  acc_dtype = compute_dtype(x.dtype)
  kernel = functools.partial(_forward_kernel, geo=geo, block_q=config.block_q, acc_dtype=acc_dtype)
  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((geo.q, geo.cp), x.dtype),
      grid=(pl.cdiv(geo.q, config.block_q),),
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.no_block_spec,
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="dcnv3_forward",
  )(_table(x, geo), offset.reshape(geo.q, geo.p * 2), mask.reshape(geo.q, geo.p))
  return _untable(out, geo, (n, geo.ho, geo.wo, channels))


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret"))
def backward(x, offset, mask, grad_out, *, params: DCNv3Params, config: TritonConfig,
             interpret: bool):
  n, h, w, channels = x.shape
  geo = _Geometry(params, n, h, w, channels)
  acc_dtype = compute_dtype(x.dtype)
  table = _table(x, geo)
  kernel = functools.partial(_backward_kernel, geo=geo, block_q=config.block_q,
                             acc_dtype=acc_dtype)
  grad_offset, grad_mask, grad_table = pl.pallas_call(
      kernel,
      out_shape=(
          jax.ShapeDtypeStruct((geo.q, geo.p * 2), offset.dtype),
          jax.ShapeDtypeStruct((geo.q, geo.p), mask.dtype),
          jax.ShapeDtypeStruct(table.shape, acc_dtype),
      ),
      grid=(pl.cdiv(geo.q, config.block_q),),
      in_specs=[pl.no_block_spec] * 5,
      out_specs=(pl.no_block_spec,) * 3,
      input_output_aliases={4: 2},
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="dcnv3_backward",
  )(table, offset.reshape(geo.q, geo.p * 2), mask.reshape(geo.q, geo.p),
    _table(grad_out, geo), jnp.zeros(table.shape, acc_dtype))
  return (_untable(grad_table, geo, x.shape).astype(x.dtype),
          grad_offset.reshape(offset.shape), grad_mask.reshape(mask.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dcnv3_triton(x, offset, mask, params: DCNv3Params, config: TritonConfig, interpret: bool):
  """The DCNv3 sampling operator as Pallas Triton kernels (shapes already validated)."""
  return forward(x, offset, mask, params=params, config=config, interpret=interpret)


def _fwd(x, offset, mask, params, config, interpret):
  return dcnv3_triton(x, offset, mask, params, config, interpret), (x, offset, mask)


def _bwd(params, config, interpret, residuals, grad_out):
  return backward(*residuals, grad_out, params=params, config=config, interpret=interpret)


dcnv3_triton.defvjp(_fwd, _bwd)
