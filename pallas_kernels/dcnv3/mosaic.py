"""DCNv3 sampling as Pallas Mosaic (TPU) kernels, forward and backward.

Mosaic has no vector gather from a ref, so the design splits the operator where
each part is cheap on a TPU:

* XLA computes, elementwise, every sampling point's four bilinear corners: a row
  index into its (image, group) slab and a weight (mask x bilinear weight, zero for
  corners outside the image). This is index arithmetic that XLA fuses well and the
  scalar unit would do one element at a time.
* The kernels do the data movement. The (image, group) slab ``[H*W, C]`` of ``x``
  sits whole in VMEM (in float32: single rows at dynamic offsets are 32-bit sublane
  slices, which Mosaic supports for every C; bfloat16 rows would be packed pairs); a grid step owns ``block_q`` output pixels of that slab, and
  its corner indices and weights arrive as blocks in SMEM (scalar memory). Per
  output pixel the kernel reads each corner's row with a dynamic sublane slice and
  accumulates ``weight * row`` in float32 vector registers: no gather instruction,
  no one-hot matrix, exact for any offset (far offsets only change which row is read).
* Backward, the same walk forms ``<row, grad_out>`` per corner (the offset and mask
  gradients follow from these in XLA, with the weights' derivatives) and adds
  ``weight * grad_out`` into the slab's gradient, which stays resident in VMEM across
  the grid's sequential q axis: the TPU's sequential grid makes this scatter
  race-free without atomics.

Alternatives considered: a one-hot bilinear matrix on the MXU needs a bounded window
(InternImage's learned offsets are unbounded, so a second path for far points) and
costs ``window x C`` multiply-adds per point; per-corner DMA costs a descriptor per
16-128-byte row. The row-load design is exact for all inputs with one code path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dcnv3.config import MosaicConfig
from pallas_kernels.dcnv3.params import DCNv3Params
from pallas_kernels.dcnv3.reference import Corner, output_centres, bilinear_corners, compute_dtype


def _positions(offset: jax.Array, params: DCNv3Params, dtype):
  """Sampling positions ``(px, py)``, each ``[N, Ho, Wo, G, P]``."""
  n, ho, wo, _ = offset.shape
  s = params.offset_scale
  off = offset.reshape(n, ho, wo, params.group, params.num_points, 2).astype(dtype)
  grid = np.asarray(params.kernel_grid(), np.float64)  # [P, (dx, dy)]
  cx, cy = output_centres(params, ho, wo)
  px = jnp.asarray(cx, dtype)[:, None, None] + jnp.asarray(s * grid[:, 0], dtype) + s * off[..., 0]
  py = (jnp.asarray(cy, dtype)[:, None, None, None] + jnp.asarray(s * grid[:, 1], dtype)
        + s * off[..., 1])
  return px, py


def _corners(offset, params: DCNv3Params, h: int, w: int, dtype) -> list[Corner]:
  """The four corners of every point; rows index the point's own ``[H*W]`` slab."""
  px, py = _positions(offset, params, dtype)
  return bilinear_corners(px, py, batch=0, group_index=0, group=1, height=h, width=w)


def _slab_major(a: jax.Array, block_q: int) -> jax.Array:
  """``[N, Ho, Wo, G, P, 4]`` -> ``[N*G * Qp, P*4]`` (queries padded to ``block_q``): a
  run of consecutive pixels' corners is one DMA."""
  n, ho, wo, g = a.shape[:4]
  a = jnp.moveaxis(a, 3, 1).reshape(n * g, ho * wo, -1)
  pad = -(ho * wo) % block_q
  if pad:
    a = jnp.pad(a, ((0, 0), (0, pad), (0, 0)))
  return a.reshape(-1, a.shape[-1])


def _tables(offset, mask, params: DCNv3Params, h: int, w: int, block_q: int, dtype):
  corners = _corners(offset, params, h, w, dtype)
  n, ho, wo, _ = offset.shape
  m = mask.reshape(n, ho, wo, params.group, params.num_points).astype(dtype)
  index = jnp.stack([k.index for k in corners], axis=-1).astype(jnp.int32)
  weight = jnp.stack([m * k.weight for k in corners], axis=-1)
  return _slab_major(index, block_q), _slab_major(weight, block_q), corners, m


def _slabs(x: jax.Array, group: int) -> jax.Array:
  """``[N, H, W, G*C]`` -> ``[N*G, H*W, C]``."""
  n, h, w, gc = x.shape
  return jnp.moveaxis(x.reshape(n, h * w, group, gc // group), 2, 1).reshape(n * group, h * w, -1)


def _unslab(s: jax.Array, n: int, ho: int, wo: int) -> jax.Array:
  """``[N*G, Ho*Wo(+pad), C]`` -> ``[N, Ho, Wo, G*C]``."""
  g = s.shape[0] // n
  s = s[:, :ho * wo].reshape(n, g, ho * wo, -1)
  return jnp.moveaxis(s, 1, 2).reshape(n, ho, wo, -1)


def _walk(index_hbm, weight_hbm, index_smem, weight_smem, sems, *, block_q: int,
          chunk: int, steps: int, one_pixel) -> None:
  """Calls ``one_pixel(q, corner_row, corner_weight)`` for the step's ``block_q`` pixels,
  refilling the small SMEM tables of corner rows and weights ``chunk`` pixels at a time
  (SMEM is small; the whole table stays in HBM)."""
  step = pl.program_id(0) * steps + pl.program_id(1)

  def one_chunk(c, carry):
    start = step * block_q + c * chunk
    copies = [pltpu.make_async_copy(src.at[pl.ds(start, chunk)], dst, sems.at[i])
              for i, (src, dst) in enumerate(((index_hbm, index_smem),
                                              (weight_hbm, weight_smem)))]
    for copy in copies:
      copy.start()
    for copy in copies:
      copy.wait()

    def pixel(qq, carry):
      one_pixel(c * chunk + qq, lambda j: index_smem[qq, j], lambda j: weight_smem[qq, j])
      return carry

    return jax.lax.fori_loop(0, chunk, pixel, carry)

  jax.lax.fori_loop(0, block_q // chunk, one_chunk, 0)


def _forward_kernel(index_hbm, weight_hbm, x_ref, out_ref, index_smem, weight_smem, sems, *,
                    k: int, acc_dtype, **walk):
  channels = x_ref.shape[-1]

  def one_pixel(q, row, weight):
    acc = jnp.zeros((1, channels), acc_dtype)
    for j in range(k):  # the P * 4 corners, unrolled
      acc += weight(j).astype(acc_dtype) * x_ref[pl.ds(row(j), 1), :].astype(acc_dtype)
    out_ref[pl.ds(q, 1), :] = acc.astype(out_ref.dtype)

  _walk(index_hbm, weight_hbm, index_smem, weight_smem, sems, one_pixel=one_pixel, **walk)


def _backward_kernel(index_hbm, weight_hbm, x_ref, gout_ref, gx_ref, dots_ref, index_smem,
                     weight_smem, sems, *, k: int, acc_dtype, **walk):
  @pl.when(pl.program_id(1) == 0)
  def _():  # the slab's gradient accumulates over the sequential q axis
    gx_ref[...] = jnp.zeros(gx_ref.shape, gx_ref.dtype)

  lanes = jax.lax.broadcasted_iota(jnp.int32, (1, k), 1)

  def one_pixel(q, row, weight):
    g = gout_ref[pl.ds(q, 1), :].astype(acc_dtype)
    dots = jnp.zeros((1, k), acc_dtype)
    for j in range(k):
      r = row(j)
      value = x_ref[pl.ds(r, 1), :].astype(acc_dtype)
      dots = jnp.where(lanes == j, jnp.sum(value * g, axis=1, keepdims=True), dots)
      gx_ref[pl.ds(r, 1), :] += weight(j).astype(acc_dtype) * g
    dots_ref[pl.ds(q, 1), :] = dots

  _walk(index_hbm, weight_hbm, index_smem, weight_smem, sems, one_pixel=one_pixel, **walk)


def _scratch(config: MosaicConfig, k: int, acc_dtype):
  return [pltpu.SMEM((config.chunk, k), jnp.int32), pltpu.SMEM((config.chunk, k), acc_dtype),
          pltpu.SemaphoreType.DMA((2,))]


_HBM = pl.BlockSpec(memory_space=pl.ANY)  # corner tables: copied in by the kernel


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret"))
def forward(x, offset, mask, *, params: DCNv3Params, config: MosaicConfig, interpret):
  n, h, w, gc = x.shape
  g, c, k = params.group, gc // params.group, 4 * params.num_points
  ho, wo = params.output_size(h, w)
  acc_dtype = compute_dtype(x.dtype)
  bq = config.block_q
  index, weight, _, _ = _tables(offset, mask, params, h, w, bq, acc_dtype)
  q_padded = index.shape[0] // (n * g)
  steps = q_padded // bq
  out = pl.pallas_call(
      functools.partial(_forward_kernel, block_q=bq, k=k, acc_dtype=acc_dtype,
                        chunk=config.chunk, steps=steps),
      out_shape=jax.ShapeDtypeStruct((n * g, q_padded, c), acc_dtype),
      grid=(n * g, steps),
      in_specs=[_HBM, _HBM, pl.BlockSpec((None, h * w, c), lambda b, i: (b, 0, 0))],
      out_specs=pl.BlockSpec((None, bq, c), lambda b, i: (b, i, 0)),
      scratch_shapes=_scratch(config, k, acc_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret,
      name="dcnv3_forward_mosaic",
  )(index, weight, _slabs(x, g).astype(acc_dtype))
  return _unslab(out, n, ho, wo).astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("params", "config", "interpret"))
def backward(x, offset, mask, grad_out, *, params: DCNv3Params, config: MosaicConfig, interpret):
  n, h, w, gc = x.shape
  g, c, p = params.group, gc // params.group, params.num_points
  k = 4 * p
  ho, wo = params.output_size(h, w)
  acc_dtype = compute_dtype(x.dtype)
  bq = config.block_q
  index, weight, corners, m = _tables(offset, mask, params, h, w, bq, acc_dtype)
  q_padded = index.shape[0] // (n * g)
  steps = q_padded // bq
  gout = _slabs(grad_out, g).astype(acc_dtype)
  gout = jnp.pad(gout, ((0, 0), (0, q_padded - ho * wo), (0, 0)))
  grad_slabs, dots = pl.pallas_call(
      functools.partial(_backward_kernel, block_q=bq, k=k, acc_dtype=acc_dtype,
                        chunk=config.chunk, steps=steps),
      out_shape=(jax.ShapeDtypeStruct((n * g, h * w, c), acc_dtype),
                 jax.ShapeDtypeStruct((n * g, q_padded, k), acc_dtype)),
      grid=(n * g, steps),
      in_specs=[_HBM, _HBM, pl.BlockSpec((None, h * w, c), lambda b, i: (b, 0, 0)),
                pl.BlockSpec((None, bq, c), lambda b, i: (b, i, 0))],
      out_specs=(pl.BlockSpec((None, h * w, c), lambda b, i: (b, 0, 0)),
                 pl.BlockSpec((None, bq, k), lambda b, i: (b, i, 0))),
      scratch_shapes=_scratch(config, k, acc_dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="dcnv3_backward_mosaic",
  )(index, weight, _slabs(x, g).astype(acc_dtype), gout)
  grad_x = _unslab(grad_slabs, n, h, w).astype(x.dtype)
  # <corner row, grad_out> per corner -> mask and offset gradients (chain rule in XLA).
  dots = jnp.moveaxis(dots[:, :ho * wo].reshape(n, g, ho, wo, p, 4), 1, 3)
  s = params.offset_scale
  grad_mask = sum(kk.weight * dots[..., i] for i, kk in enumerate(corners))
  grad_px = m * sum(kk.dweight_dx * dots[..., i] for i, kk in enumerate(corners))
  grad_py = m * sum(kk.dweight_dy * dots[..., i] for i, kk in enumerate(corners))
  grad_offset = (s * jnp.stack([grad_px, grad_py], axis=-1)).reshape(offset.shape)
  return grad_x, grad_offset.astype(offset.dtype), grad_mask.reshape(mask.shape).astype(mask.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def dcnv3_mosaic(x, offset, mask, params: DCNv3Params, config: MosaicConfig, interpret):
  """The DCNv3 sampling operator as Pallas Mosaic kernels (shapes already validated).

  ``interpret``: ``False`` on a TPU, or ``pltpu.InterpretParams()`` to run the kernels
  on the CPU. float32 and bfloat16 (float32 accumulation); TPUs have no float64, and
  JAX's TPU interpreter has none either.
  """
  for name, a in (("x", x), ("offset", offset), ("mask", mask)):
    if jnp.dtype(a.dtype).itemsize > 4:
      raise TypeError(f"dcnv3: the Mosaic (TPU) kernels take float32 or bfloat16, {name} is "
                      f"{a.dtype}; use implementation='xla' for float64")
  return forward(x, offset, mask, params=params, config=config, interpret=interpret)


def _fwd(x, offset, mask, params, config, interpret):
  return dcnv3_mosaic(x, offset, mask, params, config, interpret), (x, offset, mask)


def _bwd(params, config, interpret, residuals, grad_out):
  return backward(*residuals, grad_out, params=params, config=config, interpret=interpret)


dcnv3_mosaic.defvjp(_fwd, _bwd)
