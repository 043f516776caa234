"""The DCNv3 sampling operator: goldens, hand-computed cases, transforms, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from helpers import (assert_rel_close, dcnv3_golden_kwargs, golden_cases, golden_index,
                     golden_tol, load_golden, precision)
from internimage_jax import ops
from pallas_kernels.dcnv3 import DCNv3Params
from pallas_kernels.dcnv3.shapes import stage_shapes

DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", golden_cases("dcnv3_core"))
def test_golden_core(case, dtype):
  entry = golden_index()[case]
  g = load_golden(case)
  kwargs = dcnv3_golden_kwargs(entry)
  with precision(dtype):
    x, offset, mask, grad_out = (jnp.asarray(g[k], dtype)
                                 for k in ("input", "offset", "mask", "grad_output"))
    op = jax.jit(functools.partial(ops.dcnv3, **kwargs))
    out, vjp = jax.vjp(op, x, offset, mask)
    grads = vjp(grad_out)
    assert out.dtype == dtype
    tol = golden_tol(dtype)
    assert_rel_close(out, g["output"], tol, "output")
    for grad, key in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
      assert grad.dtype == dtype
      assert_rel_close(grad, g[key], tol, key)


def _inputs(shape=(2, 6, 7), group=2, channels=8, points=9, seed=0, dtype=np.float32,
            offset_std=1.5):
  n, h, w = shape
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, channels)).astype(dtype)
  offset = (offset_std * rng.standard_normal((n, h, w, group * points * 2))).astype(dtype)
  mask = rng.random((n, h, w, group * points)).astype(dtype)
  return x, offset, mask


def test_integer_offset_is_a_shift():
  x, _, _ = _inputs(group=2, points=1)
  n, h, w, c = x.shape
  offset = np.zeros((n, h, w, 2 * 1 * 2), np.float32)
  offset[..., 0::2] = 1.0  # x by +1
  offset[..., 1::2] = 2.0  # y by +2
  mask = np.ones((n, h, w, 2), np.float32)
  out = ops.dcnv3(x, offset, mask, kernel_size=1, pad=0, group=2)
  want = np.zeros_like(x)
  want[:, : h - 2, : w - 1] = x[:, 2:, 1:]
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_one_hot_mask_picks_one_kernel_point():
  x, _, _ = _inputs(group=1, channels=4)
  n, h, w, c = x.shape
  offset = np.zeros((n, h, w, 9 * 2), np.float32)
  mask = np.zeros((n, h, w, 9), np.float32)
  # Points run x-outer, y-inner: p = ix * 3 + iy; ix=2, iy=0 is (dx, dy) = (+1, -1).
  mask[..., 2 * 3 + 0] = 1.0
  out = ops.dcnv3(x, offset, mask, group=1)
  want = np.zeros_like(x)
  want[:, 1:, : w - 1] = x[:, : h - 1, 1:]
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_point_fully_outside_contributes_zero():
  x, offset, mask = _inputs()
  far = np.full_like(offset, -100.0)
  out, vjp = jax.vjp(lambda a: ops.dcnv3(a, far, mask, group=2), jnp.asarray(x))
  np.testing.assert_array_equal(out, 0.0)
  (grad_x,) = vjp(jnp.ones_like(out))
  np.testing.assert_array_equal(grad_x, 0.0)


def test_point_half_outside_picks_up_edge_share():
  x, _, _ = _inputs(shape=(1, 3, 4), group=1, channels=2, points=1)
  offset = np.zeros((1, 3, 4, 2), np.float32)
  offset[..., 0] = -0.5 - np.arange(4)[None, None, :]  # px = -0.5 for every column
  offset[..., 1] = 0.25  # py = i + 0.25
  mask = np.ones((1, 3, 4, 1), np.float32)
  out = np.asarray(ops.dcnv3(x, offset, mask, kernel_size=1, pad=0, group=1))
  rows = np.concatenate([x[0, 1:, 0], np.zeros((1, 2), np.float32)])  # row i+1 (zero past end)
  want = 0.5 * (0.75 * x[0, :, 0] + 0.25 * rows)  # half of column 0, bilinear in y
  for j in range(4):
    np.testing.assert_allclose(out[0, :, j], want, rtol=1e-6, atol=1e-6)


def test_offset_scale_scales_grid_and_offsets():
  """With offset_scale s the sample sits at centre + s * (grid + offset)."""
  x, _, _ = _inputs(shape=(1, 9, 9), group=1, channels=3)
  offset = np.zeros((1, 9, 9, 18), np.float32)
  mask = np.zeros((1, 9, 9, 9), np.float32)
  mask[..., 2 * 3 + 2] = 1.0  # (dx, dy) = (+1, +1)
  offset[..., (2 * 3 + 2) * 2] = 0.5  # learned x offset of that point
  out = np.asarray(ops.dcnv3(x, offset, mask, group=1, offset_scale=2.0))
  # x: j + 2 * (1 + 0.5) = j + 3; y: i + 2.
  np.testing.assert_allclose(out[0, :7, :6], x[0, 2:, 3:], atol=1e-6)


def test_remove_center_drops_the_middle_point():
  x, offset, mask = _inputs(group=2, points=9)
  # Same sampling with the centre point's mask zeroed equals remove_center's P = 8.
  mask9 = mask.reshape(*mask.shape[:3], 2, 9).copy()
  mask9[..., 4] = 0.0
  keep = [p for p in range(9) if p != 4]
  offset9 = offset.reshape(*offset.shape[:3], 2, 9, 2)
  mask8 = mask9[..., keep].reshape(*mask.shape[:3], 16)
  offset8 = offset9[..., keep, :].reshape(*offset.shape[:3], 32)
  full = ops.dcnv3(x, offset, mask9.reshape(mask.shape), group=2)
  removed = ops.dcnv3(x, offset8, mask8, group=2, remove_center=True)
  np.testing.assert_allclose(removed, full, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(3, 5), stride=(2, 1), pad=(1, 2), dilation=(2, 1)),
    dict(kernel_size=5, stride=3, pad=0, dilation=1, remove_center=True),
    dict(kernel_size=(1, 3), stride=1, pad=(0, 1), offset_scale=0.5),
], ids=["rect", "k5s3", "1x3"])
def test_gradients_match_finite_differences_x64(kwargs):
  params = DCNv3Params.create(group=2, **kwargs)
  with precision(np.float64):
    n, h, w = 1, 9, 8
    ho, wo = params.output_size(h, w)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n, h, w, 6)))
    # Keep sampling positions away from integers, where bilinear weights have kinks.
    offset = jnp.asarray(0.3 + 0.4 * rng.random((n, ho, wo, 2 * params.num_points * 2)))
    mask = jnp.asarray(rng.random((n, ho, wo, 2 * params.num_points)))
    op = functools.partial(ops.dcnv3, group=2, **kwargs)
    check_grads(op, (x, offset, mask), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)


def test_vmap_and_jit_agree_with_a_loop():
  x, offset, mask = _inputs(shape=(2, 5, 6))
  xs, offs, masks = (np.stack([a, a[::-1] * 0.5]) for a in (x, offset, mask))
  batched = jax.jit(jax.vmap(functools.partial(ops.dcnv3, group=2)))(xs, offs, masks)
  for i in range(2):
    np.testing.assert_allclose(batched[i], ops.dcnv3(xs[i], offs[i], masks[i], group=2),
                               rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda a: jnp.sum(jax.vmap(functools.partial(ops.dcnv3, group=2))(
      a, offs, masks) ** 2))(jnp.asarray(xs))
  assert grads.shape == xs.shape and bool(jnp.all(jnp.isfinite(grads)))


def test_bfloat16_accumulates_in_float32():
  x, offset, mask = _inputs(shape=(2, 8, 8), channels=32, group=2)
  want = ops.dcnv3(x, offset, mask, group=2)
  xb, ob, mb = (jnp.asarray(a, jnp.bfloat16) for a in (x, offset, mask))
  out, vjp = jax.vjp(functools.partial(ops.dcnv3, group=2), xb, ob, mb)
  assert out.dtype == jnp.bfloat16
  grads = vjp(jnp.ones_like(out))
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
  # bf16 inputs (8 bits of mantissa) and a bf16 result; the sum itself is float32.
  assert_rel_close(out, want, 2e-2, "bf16 output")


def test_fallback_keeps_no_per_corner_copies_for_backward():
  """Forward+backward temporaries stay near the input size, far below P*4 copies."""
  shape = stage_shapes("internimage_t", batch=8)[0]
  n, s, c, g = shape.batch, shape.size, shape.channels, shape.group
  x = jax.ShapeDtypeStruct((n, s, s, c), jnp.float32)
  offset = jax.ShapeDtypeStruct((n, s, s, g * 18), jnp.float32)
  mask = jax.ShapeDtypeStruct((n, s, s, g * 9), jnp.float32)

  def fwd_bwd(x, offset, mask):
    out, vjp = jax.vjp(functools.partial(ops.dcnv3, group=g), x, offset, mask)
    return vjp(out)

  stats = jax.jit(fwd_bwd).lower(x, offset, mask).compile().memory_analysis()
  input_bytes = n * s * s * c * 4
  # Keeping the gathered corners alive would need 4 * 9 = 36 input-sized copies.
  assert stats.temp_size_in_bytes < 12 * input_bytes, stats


@pytest.mark.parametrize("kwargs,match", [
    (dict(group=3), "divisible by group"),
    (dict(group=2, kernel_size=4, remove_center=True), "odd square kernel"),
    (dict(group=2, kernel_size=(3, 5), remove_center=True), "odd square kernel"),
    (dict(group=2, stride=0), "stride"),
    (dict(group=2, pad=-1), "pad"),
    (dict(group=2, implementation="cuda"), "unknown implementation"),
    (dict(group=2, kernel_size=(3, 3, 3)), "pair"),
])
def test_bad_arguments_are_named(kwargs, match):
  x, offset, mask = _inputs(channels=8, group=2)
  with pytest.raises((ValueError, TypeError), match=match):
    ops.dcnv3(x, offset, mask, **kwargs)


def test_bad_shapes_are_named():
  x, offset, mask = _inputs(channels=8, group=2)
  with pytest.raises(ValueError, match="offset must have shape"):
    ops.dcnv3(x, offset[..., :-2], mask, group=2)
  with pytest.raises(ValueError, match="mask must have shape"):
    ops.dcnv3(x, offset, mask[:, :-1], group=2)
  with pytest.raises(ValueError, match="rank 4"):
    ops.dcnv3(x[0], offset, mask, group=2)
  with pytest.raises(ValueError, match="too small"):
    ops.dcnv3(x[:, :2, :2], offset, mask, group=2, kernel_size=5, pad=0)
