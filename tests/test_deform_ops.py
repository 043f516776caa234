"""Deformable convolution and RoI operators: torchvision goldens, identities, modules."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import GOLDEN_DIR, assert_rel_close, golden_tol, load_golden, precision
from internimage_jax import models, ops
from internimage_jax.ops import roi as roi_module

OPS_INDEX = "index_ops.json"
DTYPES = [np.float32, np.float64]


@pytest.fixture(autouse=True)
def _exact_matmuls():
  """float32 matmuls in full precision: GPUs default to TF32 (~1e-3 relative), above
  the goldens' 1e-4. (No effect on the CPU.)"""
  with jax.default_matmul_precision("highest"):
    yield


def _golden_case_names() -> list[str]:
  path = GOLDEN_DIR / OPS_INDEX
  if not path.is_file():
    return ["<golden missing>"]
  return sorted(json.loads(path.read_text()))


def _golden_spec(name: str) -> dict:
  return json.loads((GOLDEN_DIR / OPS_INDEX).read_text())[name]


def _roi_call(spec: dict):
  """The golden's RoI operator with its static arguments, as ``f(input, rois)``."""
  fn = getattr(ops, spec["kind"])
  kw = {k: spec[k] for k in ("spatial_scale", "sampling_ratio", "aligned") if k in spec}
  size = tuple(spec["output_size"])
  return lambda x, rois: fn(x, rois, size, **kw)


def _golden_run(name: str, dtype) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Outputs and gradients for one golden case: ``(ours, golden)`` keyed alike."""
  golden = load_golden(name)
  spec = _golden_spec(name)
  arr = lambda k: jnp.asarray(golden[k], dtype)
  if spec["kind"] == "deform_conv2d":
    names = ["input", "offset", "weight", "bias"] + (["mask"] if spec["modulated"] else [])

    def f(*args):
      kw = dict(zip(names, args))
      return ops.deform_conv2d(kw["input"], kw["offset"], kw["weight"], kw["bias"],
                               spec["stride"], spec["padding"], spec["dilation"],
                               kw.get("mask"))
  else:
    names = ["input"]
    call = _roi_call(spec)
    rois = arr("rois")
    f = lambda x: call(x, rois)

  @jax.jit
  def run(args, cotangent):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(cotangent)

  out, grads = run([arr(k) for k in names], arr("grad_output"))
  got = {"output": out, **{f"grad_{k}": g for k, g in zip(names, grads)}}
  return got, golden


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", _golden_case_names())
def test_golden_outputs_and_gradients(name, dtype):
  with precision(dtype):
    got, golden = _golden_run(name, dtype)
  tol = golden_tol(dtype)
  expected = [k for k in golden if k == "output" or k.startswith("grad_") and k != "grad_output"]
  assert set(expected) == set(got), f"{name}: golden arrays {expected}, computed {sorted(got)}"
  for key in expected:
    assert got[key].dtype == np.dtype(dtype), key
    assert_rel_close(got[key], golden[key], tol, f"{name} {key} {np.dtype(dtype).name}")


# -- an independent reference for the RoIAlign family (torchvision's loops, in numpy) ---


def _np_bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  """torchvision's RoIAlign ``bilinear_interpolate``, vectorised: ``[C, *y.shape]``."""
  _, h, w = image.shape
  empty = (y < -1.0) | (y > h) | (x < -1.0) | (x > w)
  y = np.where(y <= 0, 0.0, y)
  x = np.where(x <= 0, 0.0, x)
  y_low, x_low = y.astype(int), x.astype(int)
  top, right = y_low >= h - 1, x_low >= w - 1
  y_low = np.where(top, h - 1, y_low)
  x_low = np.where(right, w - 1, x_low)
  y_high = np.where(top, h - 1, y_low + 1)
  x_high = np.where(right, w - 1, x_low + 1)
  y = np.where(top, y_low, y)
  x = np.where(right, x_low, x)
  ly, lx = y - y_low, x - x_low
  hy, hx = 1 - ly, 1 - lx
  val = (hy * hx * image[:, y_low, x_low] + hy * lx * image[:, y_low, x_high]
         + ly * hx * image[:, y_high, x_low] + ly * lx * image[:, y_high, x_high])
  return np.where(empty, 0.0, val)


def _np_aligned_pool(x, rois, size, scale, ratio, *, aligned, legacy_min=False, offset=None,
                     gamma=0.1, position_sensitive=False) -> np.ndarray:
  """RoIAlign / PSRoIAlign / deformable RoI pooling by their definitions' loops."""
  ph, pw = size
  c = x.shape[1] // (ph * pw) if position_sensitive else x.shape[1]
  out = np.zeros((len(rois), c, ph, pw))
  for k, r in enumerate(rois):
    x1, y1, x2, y2 = r[1:] * scale - (0.5 if aligned else 0.0)
    rw, rh = x2 - x1, y2 - y1
    if legacy_min:
      rw, rh = max(rw, 1.0), max(rh, 1.0)
    gh = ratio if ratio > 0 else int(np.ceil(rh / ph))
    gw = ratio if ratio > 0 else int(np.ceil(rw / pw))
    count = max(gh * gw, 1)
    for i in range(ph):
      for j in range(pw):
        sy, sx = y1, x1
        if offset is not None:
          sx, sy = sx + gamma * rw * offset[k, 0, i, j], sy + gamma * rh * offset[k, 1, i, j]
        ys = sy + i * rh / ph + (np.arange(max(gh, 0)) + 0.5) * (rh / ph) / max(gh, 1)
        xs = sx + j * rw / pw + (np.arange(max(gw, 0)) + 0.5) * (rw / pw) / max(gw, 1)
        image = x[int(r[0])]
        if position_sensitive:
          image = image[np.arange(c) * ph * pw + i * pw + j]
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        out[k, :, i, j] = _np_bilinear(image, yy, xx).reshape(c, -1).sum(1) / count
  return out


def _random_boxes(rng, k: int, n: int, extent: float) -> np.ndarray:
  """Boxes of every kind: inside, straddling, outside, tiny, zero-size, inverted, huge."""
  xy = rng.uniform(-0.3 * extent, 1.2 * extent, (k, 2))
  wh = rng.uniform(0, 0.8 * extent, (k, 2))
  boxes = np.concatenate([rng.integers(0, n, (k, 1)), xy, xy + wh], 1)
  boxes[0, 1:] = [3.0, 4.0, 3.0, 4.0]  # zero size
  boxes[1, 1:] = [9.0, 7.0, 5.0, 2.0]  # inverted
  # Huge. Not on round numbers: RoIAlign's rule is discontinuous where a sampling
  # point lies exactly at -1 or at the size (sampled there, zero just beyond), and
  # whether a computed point lands on such a value is up to the last bit.
  boxes[2, 1:] = [-3.07 * extent, -2.13 * extent, 4.11 * extent, 3.03 * extent]
  boxes[3, 1:] = [2.3, 2.2, 2.6, 2.9]  # tiny
  return boxes


@pytest.mark.parametrize("ratio", [0, 3])
def test_roi_align_family_matches_the_loop_reference(ratio):
  """Random boxes of every kind and random per-bin offsets, both sampling strategies."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 18, 11, 13))
  boxes = _random_boxes(rng, 10, 2, extent=24.0)
  offset = rng.uniform(-1, 1, (10, 2, 3, 3))
  with precision(np.float64):
    xj, bj = jnp.asarray(x), jnp.asarray(boxes)
    cases = {
        "roi_align": (ops.roi_align(xj, bj, 3, 0.5, ratio, aligned=True),
                      _np_aligned_pool(x, boxes, (3, 3), 0.5, ratio, aligned=True)),
        "roi_align legacy": (ops.roi_align(xj, bj, (3, 2), 0.5, ratio),
                             _np_aligned_pool(x, boxes, (3, 2), 0.5, ratio, aligned=False,
                                              legacy_min=True)),
        "ps_roi_align": (ops.ps_roi_align(xj, bj, 3, 0.5, ratio),
                         _np_aligned_pool(x, boxes, (3, 3), 0.5, ratio, aligned=True,
                                          position_sensitive=True)),
        "deform_roi_pool": (ops.deform_roi_pool(xj, bj, jnp.asarray(offset), 3, 0.5, ratio, 0.3),
                            _np_aligned_pool(x, boxes, (3, 3), 0.5, ratio, aligned=True,
                                             offset=offset, gamma=0.3)),
        "deform_roi_pool ps": (
            ops.deform_roi_pool(xj, bj, jnp.asarray(offset), 3, 0.5, ratio, 0.3, True),
            _np_aligned_pool(x, boxes, (3, 3), 0.5, ratio, aligned=True, offset=offset,
                             gamma=0.3, position_sensitive=True)),
    }
  for name, (got, want) in cases.items():
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-12, err_msg=name)


def test_deform_roi_pool_without_offsets_is_aligned_roi_align():
  golden = load_golden("roi_align_aligned")
  spec = _golden_spec("roi_align_aligned")
  assert spec["aligned"] and spec["sampling_ratio"] == 2
  x, rois = jnp.asarray(golden["input"], jnp.float32), jnp.asarray(golden["rois"], jnp.float32)
  size, scale = tuple(spec["output_size"]), spec["spatial_scale"]
  zeros = jnp.zeros((rois.shape[0], 2, *size))
  f = lambda x: ops.deform_roi_pool(x, rois, zeros, size, scale, 2)
  out, vjp = jax.vjp(f, x)
  (grad,) = vjp(jnp.asarray(golden["grad_output"], jnp.float32))
  assert_rel_close(out, golden["output"], golden_tol(np.float32), "output")
  assert_rel_close(grad, golden["grad_input"], golden_tol(np.float32), "grad_input")
  # Adaptive sampling, and no offset at all, agree with roi_align too.
  np.testing.assert_allclose(ops.deform_roi_pool(x, rois, None, size, scale, 0),
                             ops.roi_align(x, rois, size, scale, 0, aligned=True), atol=1e-6)


@pytest.mark.parametrize("ratio", [0, 2])
def test_constant_offset_per_roi_shifts_the_box(ratio):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 4, 12, 14)), jnp.float32)
  boxes = np.concatenate([[[0], [1], [1], [0]], rng.uniform(0, 10, (4, 2)),
                          rng.uniform(12, 26, (4, 2))], 1).astype(np.float32)
  shift = rng.uniform(-1, 1, (4, 2)).astype(np.float32)  # (x, y), in units of the box size
  gamma, scale = 0.2, 0.5
  offset = jnp.broadcast_to(jnp.asarray(shift)[:, :, None, None], (4, 2, 3, 2))
  got = ops.deform_roi_pool(x, jnp.asarray(boxes), offset, (3, 2), scale, ratio, gamma)
  size = boxes[:, 3:5] - boxes[:, 1:3]
  moved = boxes.copy()
  moved[:, 1:3] += gamma * shift * size
  moved[:, 3:5] += gamma * shift * size
  want = ops.roi_align(x, jnp.asarray(moved), (3, 2), scale, ratio, aligned=True)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_adaptive_and_fixed_grids_agree_when_the_grid_is_the_same():
  """Boxes whose adaptive grid is 2x2 in every bin: the dense closed-form path against
  the gathering path, values and gradients (input, boxes)."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 3, 10, 10)), jnp.float32)
  corner = rng.uniform(-4, 14, (5, 2))
  extent = rng.uniform(1.05, 2.0, (5, 2)) * np.array([3, 2]) * 2  # bins of 1.05..2 px
  boxes = jnp.asarray(np.concatenate([rng.integers(0, 2, (5, 1)), corner, corner + extent], 1),
                      jnp.float32)
  loss = lambda ratio: lambda x, b: jnp.sum(jnp.sin(ops.roi_align(x, b, (2, 3), 0.5, ratio)))
  both = jax.jit(lambda x, b: [jax.value_and_grad(loss(r), argnums=(0, 1))(x, b) for r in (0, 2)])
  (v0, g0), (v2, g2) = both(x, boxes)
  np.testing.assert_allclose(v0, v2, rtol=1e-5)
  np.testing.assert_allclose(g0[0], g2[0], atol=1e-5)
  np.testing.assert_allclose(g0[1], g2[1], atol=1e-4)


def test_chunked_rois_equal_one_batch(monkeypatch):
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 8, 9, 9)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, 7, 2, 18.0), jnp.float32)

  def run(x):
    calls = (lambda x: ops.roi_align(x, boxes, 2, 0.5, 0, True),  # the dense path
             lambda x: ops.roi_pool(x, boxes, 2, 0.5))
    return [jax.value_and_grad(lambda x: jnp.sum(f(x) ** 2))(x) for f in calls]

  whole = run(x)
  monkeypatch.setattr(roi_module, "_CHUNK_ELEMENTS", 3 * 8 * 81)  # chunks of 1-3 RoIs
  jax.clear_caches()  # the operators are jitted: trace them again with small chunks
  for (value, grad), (value_1, grad_1) in zip(run(x), whole):
    np.testing.assert_allclose(value, value_1, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_1, atol=1e-6)


def _all_roi_ops(size=(2, 2)):
  """Every RoI operator as ``f(x, boxes, offset)`` on 8 channels (4 per PS bin group)."""
  return {
      "roi_pool": lambda x, b, o: ops.roi_pool(x, b, size, 0.5),
      "ps_roi_pool": lambda x, b, o: ops.ps_roi_pool(x, b, size, 0.5),
      "roi_align": lambda x, b, o: ops.roi_align(x, b, size, 0.5, 0, aligned=True),
      "roi_align_legacy": lambda x, b, o: ops.roi_align(x, b, size, 0.5, 2),
      "ps_roi_align": lambda x, b, o: ops.ps_roi_align(x, b, size, 0.5, 0),
      "deform_roi_pool": lambda x, b, o: ops.deform_roi_pool(x, b, o, size, 0.5, 0),
      "deform_roi_pool_fixed": lambda x, b, o: ops.deform_roi_pool(x, b, o, size, 0.5, 2),
  }


@pytest.mark.parametrize("name", list(_all_roi_ops()))
def test_empty_and_outside_boxes_give_finite_zeros(name):
  f = _all_roi_ops()[name]
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((2, 8, 6, 6)), jnp.float32)
  boxes = jnp.asarray([[0, 40, 40, 60, 50],  # beyond the bottom-right corner
                       [1, -90, -80, -30, -20],  # beyond the top-left corner
                       [1, 1e6, 1e6, 3e6, 2e6],  # far away and huge
                       [0, 5, 5, 5, 5]], jnp.float32)  # zero size
  offset = jnp.asarray(rng.uniform(-1, 1, (4, 2, 2, 2)), jnp.float32)
  no_boxes, no_offset = jnp.zeros((0, 5), jnp.float32), jnp.zeros((0, 2, 2, 2), jnp.float32)

  @jax.jit
  def run(x, boxes, offset):
    loss = lambda x, b, o: jnp.sum(jnp.sin(f(x, b, o)))
    return (f(x, boxes, offset), jax.grad(loss, argnums=(0, 1, 2))(x, boxes, offset),
            f(x, no_boxes, no_offset), jax.grad(loss)(x, no_boxes, no_offset))

  out, grads, none, none_grad = run(x, boxes, offset)
  assert all(bool(jnp.isfinite(g).all()) for g in grads), name
  assert bool(jnp.isfinite(out).all())
  np.testing.assert_array_equal(out[:3], 0.0)
  # Zero-size boxes keep torchvision's meaning where it is not empty: the legacy
  # RoIAlign forces a 1x1 box, the RoI pools a one-pixel box, and a fixed grid
  # samples the box's single point. With adaptive grids they have no samples.
  if name not in ("roi_pool", "roi_align_legacy", "ps_roi_pool", "deform_roi_pool_fixed"):
    np.testing.assert_array_equal(out[3], 0.0)
  assert none.shape == (0, out.shape[1], 2, 2)
  np.testing.assert_array_equal(none_grad, 0.0)


def test_boxes_as_a_list_per_image():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((2, 3, 8, 8)), jnp.float32)
  per_image = [jnp.asarray([[1.0, 1, 9, 7]]), jnp.asarray([[0.0, 2, 5, 12], [3, 3, 14, 14]])]
  stacked = jnp.asarray([[0, 1, 1, 9, 7], [1, 0, 2, 5, 12], [1, 3, 3, 14, 14]], jnp.float32)
  np.testing.assert_array_equal(ops.roi_align(x, per_image, 2, 0.5),
                                ops.roi_align(x, stacked, 2, 0.5))


def test_roi_pool_ties_send_the_gradient_to_the_first_maximum():
  x = np.zeros((1, 1, 6, 6), np.float32)
  x[0, 0, 2, 4] = x[0, 0, 3, 1] = x[0, 0, 2, 5] = 5.0  # row-major first: (2, 4)
  boxes = jnp.asarray([[0, 0, 0, 5, 5]], jnp.float32)
  grad = jax.grad(lambda x: ops.roi_pool(x, boxes, 1).sum())(jnp.asarray(x))
  want = np.zeros_like(x)
  want[0, 0, 2, 4] = 1.0
  np.testing.assert_array_equal(grad, want)


def test_vmap_over_problems_equals_a_loop():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((3, 2, 8, 7, 7)), jnp.float32)
  boxes = jnp.asarray(np.stack([_random_boxes(rng, 5, 2, 14.0) for _ in range(3)]), jnp.float32)
  offset = jnp.asarray(rng.uniform(-1, 1, (3, 5, 2, 2, 2)), jnp.float32)
  calls = _all_roi_ops()
  for name in ("roi_pool", "ps_roi_pool", "roi_align", "deform_roi_pool_fixed"):
    f = calls[name]
    batched = jax.vmap(f)(x, boxes, offset)
    looped = jnp.stack([f(x[i], boxes[i], offset[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, atol=1e-5, err_msg=name)


# -- deform_conv2d ----------------------------------------------------------------------


@pytest.mark.parametrize("modulated", [False, True])
def test_deform_conv2d_without_offsets_is_the_convolution(modulated):
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.standard_normal((2, 8, 11, 10)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((6, 4, 3, 2)), jnp.float32)  # groups 2
  bias = jnp.asarray(rng.standard_normal(6), jnp.float32)
  stride, padding, dilation = (2, 1), (1, 2), (2, 3)

  def conv(x, w):
    y = jax.lax.conv_general_dilated(x, w, stride, [(1, 1), (2, 2)], rhs_dilation=dilation,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"),
                                     feature_group_count=2, precision="highest")
    return y + bias[:, None, None]

  want = conv(x, weight)
  n, _, ho, wo = want.shape
  offset = jnp.zeros((n, 2 * 4 * 6, ho, wo))  # offset_groups 4
  mask = jnp.ones((n, 4 * 6, ho, wo)) if modulated else None
  f = lambda x, w: ops.deform_conv2d(x, offset, w, bias, stride, padding, dilation, mask)
  np.testing.assert_allclose(f(x, weight), want, atol=1e-4)
  cotangent = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
  got = jax.vjp(f, x, weight)[1](cotangent)
  ref = jax.vjp(conv, x, weight)[1](cotangent)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(g, r, atol=1e-4)


def test_deform_conv2d_offsets_outside_the_image_leave_the_bias():
  x = jnp.ones((1, 2, 5, 5))
  weight = jnp.ones((3, 2, 3, 3))
  bias = jnp.asarray([1.0, 2.0, 3.0])
  offset = jnp.full((1, 18, 5, 5), 40.0)
  out, grads = jax.value_and_grad(
      lambda x, o: jnp.sum(ops.deform_conv2d(x, o, weight, bias, padding=1)), argnums=(0, 1))(
          x, offset)
  np.testing.assert_allclose(out, 25 * 6.0)
  for g in grads:
    np.testing.assert_array_equal(g, 0.0)


def test_deform_conv2d_vmap_and_jit():
  rng = np.random.default_rng(9)
  x = jnp.asarray(rng.standard_normal((3, 1, 4, 6, 6)), jnp.float32)
  offset = jnp.asarray(rng.standard_normal((3, 1, 18, 6, 6)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(3, 1, 9, 6, 6)), jnp.float32)
  weight = jnp.asarray(rng.standard_normal((5, 4, 3, 3)), jnp.float32)
  f = lambda x, o, m: ops.deform_conv2d(x, o, weight, None, 1, 1, 1, m)
  grad = jax.grad(lambda x, o, m: jnp.sum(jnp.sin(f(x, o, m))), argnums=(0, 1, 2))
  batched = jax.jit(jax.vmap(lambda *a: (f(*a), grad(*a))))(x, offset, mask)
  looped = [(f(x[i], offset[i], mask[i]), grad(x[i], offset[i], mask[i])) for i in range(3)]
  for i, one in enumerate(looped):
    for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      np.testing.assert_allclose(got[i], want, atol=1e-5)


def test_gradients_match_finite_differences():
  """float64 gradients against central differences, away from the rule's kinks."""
  from jax.test_util import check_grads

  rng = np.random.default_rng(13)
  with precision(np.float64):
    x = jnp.asarray(rng.standard_normal((2, 4, 7, 6)))
    offset = jnp.asarray(2 * rng.standard_normal((2, 36, 7, 6)))
    mask = jnp.asarray(rng.uniform(size=(2, 18, 7, 6)))
    weight = jnp.asarray(rng.standard_normal((4, 2, 3, 3)))
    check_grads(lambda x, o, m, w: ops.deform_conv2d(x, o, w, None, 1, 1, 1, m),
                (x, offset, mask, weight), 1, modes=["rev"], eps=1e-6)
    boxes = jnp.asarray(_random_boxes(rng, 6, 2, 14.0)[2:])  # non-degenerate ones
    roi_offset = jnp.asarray(rng.uniform(-1, 1, (4, 2, 2, 3)))
    with_coords = lambda c: jnp.concatenate([boxes[:, :1], c], 1)  # batch index fixed
    for ratio in (0, 2):
      check_grads(lambda x, o, c: ops.deform_roi_pool(x, with_coords(c), o, (2, 3), 0.5, ratio),
                  (x, roi_offset, boxes[:, 1:]), 1, modes=["rev"], eps=1e-6)


# -- bfloat16 ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deform_conv2d", "roi_pool", "ps_roi_pool", "roi_align",
                                  "deform_roi_pool_fixed"])
def test_bfloat16_is_close_to_float32(name):
  """bfloat16 features (float32 boxes and offsets) against float32 on the same values."""
  rng = np.random.default_rng(10)
  x = jnp.asarray(rng.standard_normal((2, 8, 9, 9)), jnp.bfloat16)
  if name == "deform_conv2d":
    offset = jnp.asarray(rng.standard_normal((2, 36, 9, 9)), jnp.bfloat16)
    mask = jnp.asarray(rng.uniform(size=(2, 18, 9, 9)), jnp.bfloat16)
    weight = jnp.asarray(rng.standard_normal((6, 8, 3, 3)) / 8, jnp.bfloat16)
    f = lambda x: ops.deform_conv2d(x, offset.astype(x.dtype), weight.astype(x.dtype), None,
                                    1, 1, 1, mask.astype(x.dtype))
  else:
    boxes = jnp.asarray(_random_boxes(rng, 6, 2, 18.0), jnp.float32)
    offset = jnp.asarray(rng.uniform(-1, 1, (6, 2, 2, 2)), jnp.float32)
    f = lambda x: _all_roi_ops()[name](x, boxes, offset)
  run = jax.jit(lambda x: jax.value_and_grad(
      lambda x: jnp.sum(f(x).astype(jnp.float32) ** 2), has_aux=False)(x) + (f(x),))
  _, grad, low = run(x)
  _, grad32, high = run(x.astype(jnp.float32))
  assert low.dtype == grad.dtype == jnp.bfloat16
  assert_rel_close(low, high, 2e-2, name)
  assert_rel_close(grad, grad32, 3e-2, f"{name} grad")


# -- modules ----------------------------------------------------------------------------


def _conv_nchw(x, w, stride, padding, dilation):
  return jax.lax.conv_general_dilated(x, w, stride, [(p, p) for p in padding],
                                      rhs_dilation=dilation, precision="highest",
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))


@pytest.mark.parametrize("cls", [models.DeformConv2d, models.ModulatedDeformConv2d])
def test_deform_conv_modules_at_init_are_the_plain_convolution(cls):
  module = cls(4, 6, 3, stride=2, padding=1, dilation=1, offset_groups=2, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(11).standard_normal((2, 4, 9, 9)), jnp.float32)
  conv = _conv_nchw(x, module.weight[...], (2, 2), (1, 1), (1, 1))
  # DCNv2 starts with mask sigmoid(0) = 0.5, as the original.
  scale = 0.5 if cls is models.ModulatedDeformConv2d else 1.0
  want = scale * conv + module.bias[...][:, None, None]
  np.testing.assert_allclose(module(x), want, atol=1e-5)
  assert module.conv_offset.weight[...].shape == ((3 if scale < 1 else 2) * 2 * 9, 4, 3, 3)
  # The offset branch learns: its gradient is not zero.
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(m(x)))))(module)
  assert float(jnp.abs(grads.conv_offset.weight[...]).max()) > 0
  with pytest.raises(ValueError, match=r"expected input \[N, 4, H, W\]"):
    module(jnp.zeros((1, 3, 9, 9)))


def test_deform_roi_pool_module_at_init_is_aligned_roi_align():
  module = models.DeformRoIPool((3, 2), 0.5, sampling_ratio=2, gamma=0.1, channels=4,
                                rngs=nnx.Rngs(0))
  rng = np.random.default_rng(12)
  x = jnp.asarray(rng.standard_normal((2, 4, 10, 10)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, 5, 2, 20.0), jnp.float32)
  np.testing.assert_allclose(module(x, boxes),
                             ops.roi_align(x, boxes, (3, 2), 0.5, 2, aligned=True), atol=1e-6)
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(jnp.sin(3 * m(x, boxes)))))(module)
  assert float(jnp.abs(grads.offset_fc.kernel[...]).max()) > 0


# -- errors -----------------------------------------------------------------------------


def test_errors_name_the_argument():
  x = jnp.zeros((1, 8, 6, 6))
  w = jnp.zeros((4, 8, 3, 3))
  off = jnp.zeros((1, 18, 4, 4))
  with pytest.raises(ValueError, match="input must be rank 4"):
    ops.deform_conv2d(jnp.zeros((8, 6, 6)), off, w)
  with pytest.raises(ValueError, match="weight expects 3 input channels per group"):
    ops.deform_conv2d(x, off, jnp.zeros((4, 3, 3, 3)))
  with pytest.raises(ValueError, match="output channels are not divisible by groups"):
    ops.deform_conv2d(x, off, jnp.zeros((3, 4, 3, 3)))
  with pytest.raises(ValueError, match="offset must have 2 \\* offset_groups"):
    ops.deform_conv2d(x, jnp.zeros((1, 17, 4, 4)), w)
  with pytest.raises(ValueError, match="offset_groups \\(3"):
    ops.deform_conv2d(x, jnp.zeros((1, 54, 4, 4)), w)
  with pytest.raises(ValueError, match="offset must have shape"):
    ops.deform_conv2d(x, jnp.zeros((1, 18, 6, 6)), w)
  with pytest.raises(ValueError, match="mask must have shape"):
    ops.deform_conv2d(x, off, w, mask=jnp.zeros((1, 18, 4, 4)))
  with pytest.raises(ValueError, match="bias must have shape"):
    ops.deform_conv2d(x, off, w, jnp.zeros(5))
  boxes = jnp.zeros((2, 5))
  with pytest.raises(ValueError, match="boxes must be \\[K, 5\\]"):
    ops.roi_align(x, jnp.zeros((2, 4)), 2)
  with pytest.raises(ValueError, match="boxes\\[0\\] must be \\[L, 4\\]"):
    ops.roi_pool(x, [jnp.zeros((2, 5))], 2)
  with pytest.raises(ValueError, match="input must be rank 4"):
    ops.roi_pool(jnp.zeros((8, 6, 6)), boxes, 2)
  with pytest.raises(ValueError, match="input channels \\(8\\) must be divisible"):
    ops.ps_roi_align(x, boxes, 3)
  with pytest.raises(ValueError, match="input channels \\(8\\) must be divisible"):
    ops.ps_roi_pool(x, boxes, 3)
  with pytest.raises(ValueError, match="offset must have shape \\(2, 2, 2, 2\\)"):
    ops.deform_roi_pool(x, boxes, jnp.zeros((2, 2, 3, 3)), 2)
  with pytest.raises(ValueError, match="output_size"):
    ops.roi_align(x, boxes, (2, 2, 2))
  with pytest.raises(ValueError, match="groups"):
    models.DeformConv2d(6, 4, 3, groups=4, rngs=nnx.Rngs(0))


def test_nhwc_and_nchw_agree():
  """``layout="NHWC"`` (channels-last, as InternImage's features) = NCHW transposed, for
  every operator, outputs and input gradients."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 8, 9, 11)), jnp.float32)  # NCHW
  boxes = jnp.asarray([[0, 1.0, 2.0, 15.0, 12.0], [1, 4.0, 0.5, 9.0, 17.0]], jnp.float32)
  offset = jnp.asarray(rng.normal(size=(2, 2, 2, 2)), jnp.float32)
  nhwc = jnp.moveaxis(x, 1, -1)
  size = (2, 2)
  cases = {
      "roi_pool": lambda a, layout: ops.roi_pool(a, boxes, size, 0.5, layout=layout),
      "ps_roi_pool": lambda a, layout: ops.ps_roi_pool(a, boxes, size, 0.5, layout=layout),
      "roi_align": lambda a, layout: ops.roi_align(a, boxes, size, 0.5, 0, aligned=True,
                                                   layout=layout),
      "ps_roi_align": lambda a, layout: ops.ps_roi_align(a, boxes, size, 0.5, 2, layout=layout),
      "deform_roi_pool": lambda a, layout: ops.deform_roi_pool(
          a, boxes, offset, size, 0.5, 0, position_sensitive=True, layout=layout),
  }
  for name, op in cases.items():
    want, want_vjp = jax.vjp(lambda a: op(a, "NCHW"), x)
    got, got_vjp = jax.vjp(lambda a: op(a, "NHWC"), nhwc)
    np.testing.assert_allclose(got, jnp.moveaxis(want, 1, -1), rtol=1e-6, atol=1e-6,
                               err_msg=name)
    cotangent = jnp.asarray(rng.normal(size=want.shape), jnp.float32)
    np.testing.assert_allclose(got_vjp(jnp.moveaxis(cotangent, 1, -1))[0],
                               jnp.moveaxis(want_vjp(cotangent)[0], 1, -1), rtol=1e-6,
                               atol=1e-6, err_msg=name)
  # deform_conv2d: input, offset and mask channels-last; weight unchanged.
  weight = jnp.asarray(rng.normal(size=(6, 8, 3, 3)), jnp.float32)
  off = jnp.asarray(rng.normal(size=(2, 18, 9, 11)), jnp.float32)
  mask = jnp.asarray(rng.random((2, 9, 9, 11)), jnp.float32)
  want = ops.deform_conv2d(x, off, weight, padding=1, mask=mask)
  got = ops.deform_conv2d(nhwc, *(jnp.moveaxis(a, 1, -1) for a in (off,)), weight, padding=1,
                          mask=jnp.moveaxis(mask, 1, -1), layout="NHWC")
  np.testing.assert_allclose(got, jnp.moveaxis(want, 1, -1), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="layout must be"):
    ops.roi_align(x, boxes, size, layout="HWCN")


def test_every_operator_accepts_an_empty_batch():
  x, offset, mask = jnp.zeros((0, 6, 6, 16)), jnp.zeros((0, 6, 6, 36)), jnp.zeros((0, 6, 6, 18))
  for implementation in ("xla", "pallas"):
    f = lambda x, o, m: ops.dcnv3(x, o, m, group=2, implementation=implementation)
    assert f(x, offset, mask).shape == (0, 6, 6, 16)
    grads = jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2))(x, offset, mask)
    assert [g.shape for g in grads] == [x.shape, offset.shape, mask.shape]
  images, weight = jnp.zeros((0, 4, 6, 6)), jnp.ones((5, 4, 3, 3))
  conv = lambda i, o: ops.deform_conv2d(i, o, weight, padding=1)
  assert conv(images, jnp.zeros((0, 18, 6, 6))).shape == (0, 5, 6, 6)
  assert jax.grad(lambda i: conv(i, jnp.zeros((0, 18, 6, 6))).sum())(images).shape == images.shape
  features, no_boxes = jnp.zeros((0, 8, 6, 6)), jnp.zeros((0, 5))
  for name, fn in _all_roi_ops().items():
    assert fn(features, no_boxes, None).shape[0] == 0, name
    assert jax.grad(lambda f: fn(f, no_boxes, None).sum())(features).shape == features.shape, name


def test_boxes_of_no_image_give_zeros_under_jit_and_an_error_when_concrete():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6, 6))
  boxes = jnp.array([[0, 1, 1, 4, 4], [2, 1, 1, 4, 4], [-1, 1, 1, 4, 4],
                     [1, np.nan, 1, 4, 4], [1, 0, 0, 5, np.inf]], jnp.float32)
  for name, op in _all_roi_ops().items():
    fn = jax.jit(lambda x, b, op=op: op(x, b, None))
    with pytest.raises(ValueError, match=r"\w+: box 1 has batch index 2, outside \[0, 2\) "
                                         r"\(4 bad box\(es\) of 5\)"):
      op(x, boxes, None)
    with pytest.raises(ValueError, match=r"\w+: box 0 has a non-finite number"):
      op(x, boxes[3:], None)
    out = fn(x, boxes)
    assert np.abs(np.asarray(out[0])).sum() > 0, name
    np.testing.assert_array_equal(np.asarray(out[1:]), 0, err_msg=name)
    grads = jax.grad(lambda x, b: fn(x, b).sum(), argnums=(0, 1))(x, boxes)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads), name
    # Only box 0 reads the input: the others contribute nothing to its gradient.
    alone = jax.grad(lambda x: fn(x, boxes[:1]).sum())(x)
    np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(alone), rtol=1e-6, atol=1e-7)


def test_deform_conv2d_propagates_nan_offsets_like_dcnv3():
  images, weight = jnp.ones((1, 4, 5, 5)), jnp.ones((3, 4, 3, 3))
  offset = jnp.zeros((1, 18, 5, 5)).at[0, 0, 2, 2].set(jnp.nan)
  out = ops.deform_conv2d(images, offset, weight, padding=1)
  nan = np.isnan(np.asarray(out))
  assert nan[0, :, 2, 2].all() and nan.sum() == 3  # that pixel, every output channel
  gi, go = jax.grad(lambda i, o: ops.deform_conv2d(i, o, weight, padding=1).sum(),
                    argnums=(0, 1))(images, offset)
  assert np.isnan(np.asarray(gi)).any() and np.isnan(np.asarray(go))[0, 0, 2, 2]
  x = jnp.ones((1, 5, 5, 4))
  dcn_offset = jnp.zeros((1, 5, 5, 18)).at[0, 2, 2, 0].set(jnp.nan)
  dcn = ops.dcnv3(x, dcn_offset, jnp.ones((1, 5, 5, 9)), group=1, implementation="xla")
  assert np.isnan(np.asarray(dcn))[0, 2, 2].all()  # the same convention
