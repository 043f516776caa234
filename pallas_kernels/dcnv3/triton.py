"""DCNv3 sampling as Pallas Triton (GPU) kernels, forward and backward.

Layout. With free reshapes the operands become row tables: ``x`` ``[N*H*W*G, C]``
(one row per input pixel-group), ``offset`` ``[Q, P*2]``, ``mask`` ``[Q, P]`` and the
output ``[Q, C]`` with ``Q = N*Ho*Wo*G`` output pixel-groups. A program owns
``block_q`` output pixel-groups and all ``C`` channels of each: consecutive ones, or
with ``TritonConfig.tile_rows > 1`` a tile of pixels a few rows high (vertical
neighbours sample overlapping corners). Launch configurations come per kernel and
shape from ``config.triton_config``.

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

from pallas_kernels.dcnv3.config import TritonConfig, triton_config
from pallas_kernels.dcnv3.params import DCNv3Params
from pallas_kernels.dcnv3.reference import Corner, bilinear_corners, compute_dtype


class Geometry:
  """Static sizes a kernel needs, kept as Python ints/floats, and the order in which
  programs walk the output pixels (``TritonConfig.tile_rows``)."""

  def __init__(self, params: DCNv3Params, n: int, h: int, w: int, channels: int,
               config: TritonConfig):
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
    # Pixel tiles of tile_rows x tile_cols; one tile row of the whole width is the
    # row-major order itself (lane index = output row of the table).
    self.tile_rows = min(config.tile_rows, self.ho)
    if self.tile_rows == 1:
      self.tile_cols = self.wo
    else:
      self.tile_cols = min(self.wo, max(1, config.block_q // (self.g * self.tile_rows)))
    self.tiles_y = -(-self.ho // self.tile_rows)
    self.tiles_x = -(-self.wo // self.tile_cols)
    self.lanes = n * self.tiles_y * self.tiles_x * self.tile_rows * self.tile_cols * self.g
    self.block_q = config.block_q

  @property
  def grid(self) -> tuple[int]:
    return (pl.cdiv(self.lanes, self.block_q),)


# Official models use 3x3 kernels (9 points): the loop over points is unrolled. Larger
# kernels loop instead: Triton's compile time grows steeply with the unrolled body
# (a 5x5 kernel's backward did not compile within 100 s on an H100).
_MAX_UNROLLED_POINTS = 9


def _for_each_point(geo: Geometry, body, carry):
  """``carry = body(p, carry)`` over the points: unrolled (static ``p``) or a loop."""
  if geo.p <= _MAX_UNROLLED_POINTS:
    for p in range(geo.p):
      carry = body(p, carry)
    return carry
  return jax.lax.fori_loop(0, geo.p, body, carry)


def lanes(geo: Geometry, t: jax.Array, dtype):
  """Lane indices ``t`` -> (output row q, live, batch, group, centre x, centre y).

  Program ``k`` owns lanes ``k * block_q ...``. Lanes past the end, or on a tile's
  pixels outside the output, are dead: they are mapped onto a real pixel so that
  everything they address stays in bounds, and their loads and stores are masked.
  """
  g = t % geo.g
  u = t // geo.g
  c = u % geo.tile_cols
  u = u // geo.tile_cols
  r = u % geo.tile_rows
  u = u // geo.tile_rows
  bx = u % geo.tiles_x
  u = u // geo.tiles_x
  by = u % geo.tiles_y
  n = u // geo.tiles_y
  i = by * geo.tile_rows + r
  j = bx * geo.tile_cols + c
  live = (t < geo.lanes) & (i < geo.ho) & (j < geo.wo)
  n = jnp.minimum(n, geo.n - 1)
  i = jnp.minimum(i, geo.ho - 1)
  j = jnp.minimum(j, geo.wo - 1)
  q = ((n * geo.ho + i) * geo.wo + j) * geo.g + g
  cx = (j * geo.sw + geo.base_x).astype(dtype)
  cy = (i * geo.sh + geo.base_y).astype(dtype)
  return q, live, n, g, cx, cy


def _program_lanes(geo: Geometry) -> jax.Array:
  return pl.program_id(0) * geo.block_q + jnp.arange(geo.block_q)


def _corners(px, py, n, g, geo: Geometry) -> list[Corner]:
  """The four bilinear corners of the lanes' points (rows clamped in bounds)."""
  return bilinear_corners(px, py, batch=n, group_index=g, group=geo.g, height=geo.h,
                          width=geo.w)


def _positions(off_ref, q, live, p, cx, cy, geo: Geometry, dtype):
  s = geo.params.offset_scale
  gx, gy = geo.params.grid_offset(p)  # static p, or traced inside a loop
  ox = plgpu.load(off_ref.at[q, 2 * p], mask=live, other=0.0).astype(dtype)
  oy = plgpu.load(off_ref.at[q, 2 * p + 1], mask=live, other=0.0).astype(dtype)
  return (cx + s * jnp.asarray(gx, dtype) + s * ox, cy + s * jnp.asarray(gy, dtype) + s * oy)


def _forward_kernel(x_ref, off_ref, mask_ref, out_ref, *, geo: Geometry, acc_dtype):
  q, live, n, g, cx, cy = lanes(geo, _program_lanes(geo), acc_dtype)
  ch = jnp.arange(geo.cp)
  ch_live = ch < geo.c

  def point(p, acc):
    px, py = _positions(off_ref, q, live, p, cx, cy, geo, acc_dtype)
    m = plgpu.load(mask_ref.at[q, p], mask=live, other=0.0).astype(acc_dtype)
    for k in _corners(px, py, n, g, geo):
      value = plgpu.load(x_ref.at[k.index[:, None], ch[None, :]],
                         mask=(k.inside & live)[:, None] & ch_live[None, :], other=0.0)
      acc += (m * k.weight)[:, None] * value.astype(acc_dtype)
    return acc

  acc = _for_each_point(geo, point, jnp.zeros((geo.block_q, geo.cp), acc_dtype))
  plgpu.store(out_ref.at[q[:, None], ch[None, :]], acc.astype(out_ref.dtype),
              mask=live[:, None] & ch_live[None, :])


def _backward_kernel(x_ref, off_ref, mask_ref, gout_ref, gx_init_ref,
                     goff_ref, gmask_ref, gx_ref, *, geo: Geometry, acc_dtype, scatter: bool):
  del gx_init_ref  # aliased to gx_ref: the zero-initialised accumulator
  q, live, n, g, cx, cy = lanes(geo, _program_lanes(geo), acc_dtype)
  ch = jnp.arange(geo.cp)
  ch_live = ch < geo.c
  both = live[:, None] & ch_live[None, :]
  gout = plgpu.load(gout_ref.at[q[:, None], ch[None, :]], mask=both, other=0.0).astype(acc_dtype)
  s = geo.params.offset_scale

  def point(p, carry):
    px, py = _positions(off_ref, q, live, p, cx, cy, geo, acc_dtype)
    m = plgpu.load(mask_ref.at[q, p], mask=live, other=0.0).astype(acc_dtype)
    g_mask = g_x = g_y = jnp.zeros((geo.block_q,), acc_dtype)
    for k in _corners(px, py, n, g, geo):
      value = plgpu.load(x_ref.at[k.index[:, None], ch[None, :]],
                         mask=(k.inside & live)[:, None] & ch_live[None, :], other=0.0)
      dot = jnp.sum(value.astype(acc_dtype) * gout, axis=1)
      g_mask += k.weight * dot
      g_x += k.dweight_dx * dot
      g_y += k.dweight_dy * dot
      if scatter:
        # No mask on the atomic (interpret mode has none): dead lanes add zero.
        update = jnp.where(both & k.inside[:, None], (m * k.weight)[:, None] * gout, 0.0)
        plgpu.atomic_add(gx_ref, (k.index[:, None], ch[None, :]), update.astype(gx_ref.dtype))
    plgpu.store(gmask_ref.at[q, p], g_mask.astype(gmask_ref.dtype), mask=live)
    plgpu.store(goff_ref.at[q, 2 * p], (s * m * g_x).astype(goff_ref.dtype), mask=live)
    plgpu.store(goff_ref.at[q, 2 * p + 1], (s * m * g_y).astype(goff_ref.dtype), mask=live)
    return carry

  _for_each_point(geo, point, ())


def _table(x: jax.Array, geo: Geometry) -> jax.Array:
  """``x`` as ``[N*H*W*G, Cp]`` rows, channels zero-padded to a power of two."""
  rows = x.reshape(-1, geo.g, geo.c)
  if geo.cp != geo.c:
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, geo.cp - geo.c)))
  return rows.reshape(-1, geo.cp)


def _untable(rows: jax.Array, geo: Geometry, shape) -> jax.Array:
  return rows.reshape(-1, geo.g, geo.cp)[..., : geo.c].reshape(shape)


def _compiler_params(config: TritonConfig):
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _geometry(kernel: str, x: jax.Array, params: DCNv3Params, config: TritonConfig | None
              ) -> tuple[Geometry, TritonConfig]:
  n, h, w, channels = x.shape
  c = channels // params.group
  if config is None:
    config = triton_config(kernel, max(16, int(pl.next_power_of_2(c))), x.dtype)
  return Geometry(params, n, h, w, channels, config), config


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret"))
def forward(x, offset, mask, *, params: DCNv3Params, config: TritonConfig | None,
            interpret: bool):
  """The output; ``config=None`` takes the tuned launch configuration of the shape."""
  geo, config = _geometry("forward", x, params, config)
  acc_dtype = compute_dtype(x.dtype)
  out = pl.pallas_call(
      functools.partial(_forward_kernel, geo=geo, acc_dtype=acc_dtype),
      out_shape=jax.ShapeDtypeStruct((geo.q, geo.cp), x.dtype),
      grid=geo.grid,
      in_specs=[pl.no_block_spec] * 3,
      out_specs=pl.no_block_spec,
      compiler_params=_compiler_params(config),
      interpret=interpret,
      name="dcnv3_forward",
  )(_table(x, geo), offset.reshape(geo.q, geo.p * 2), mask.reshape(geo.q, geo.p))
  return _untable(out, geo, (geo.n, geo.ho, geo.wo, x.shape[3]))


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret", "grad_x"))
def backward(x, offset, mask, grad_out, *, params: DCNv3Params, config: TritonConfig | None,
             interpret: bool, grad_x: bool = True):
  """The three input gradients. ``grad_x=False`` leaves out the input gradient's
  scatter (it comes back as zeros): for benchmarks that measure the atomics' share."""
  geo, config = _geometry("backward", x, params, config)
  acc_dtype = compute_dtype(x.dtype)
  table = _table(x, geo)
  grad_offset, grad_mask, grad_table = pl.pallas_call(
      functools.partial(_backward_kernel, geo=geo, acc_dtype=acc_dtype, scatter=grad_x),
      out_shape=(
          jax.ShapeDtypeStruct((geo.q, geo.p * 2), offset.dtype),
          jax.ShapeDtypeStruct((geo.q, geo.p), mask.dtype),
          jax.ShapeDtypeStruct(table.shape, acc_dtype),
      ),
      grid=geo.grid,
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
def dcnv3_triton(x, offset, mask, params: DCNv3Params, config: TritonConfig | None,
                 interpret: bool):
  """The DCNv3 sampling operator as Pallas Triton kernels (shapes already validated)."""
  return forward(x, offset, mask, params=params, config=config, interpret=interpret)


def _fwd(x, offset, mask, params, config, interpret):
  return dcnv3_triton(x, offset, mask, params, config, interpret), (x, offset, mask)


def _bwd(params, config, interpret, residuals, grad_out):
  return backward(*residuals, grad_out, params=params, config=config, interpret=interpret)


dcnv3_triton.defvjp(_fwd, _bwd)
