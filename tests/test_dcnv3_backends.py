"""The DCNv3 sampling operator, one suite run once per backend (as tokamax tests its
kernels): the XLA fallback (``implementation="xla"``) and the Pallas Triton (GPU) and
Mosaic (TPU) kernels, which run in interpret mode on a CPU.

The shared tests take the ``implementation`` fixture (every backend) or the
``kernel`` fixture (the two kernels, checked against the fallback); each backend's
own checks (block configurations, lowering for its hardware, the fallback's memory,
the choice behind ``"auto"``) follow in sections of their own.
"""

from __future__ import annotations

import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from jax.test_util import check_grads

from helpers import (CUDA_DEVICE, TRITON_CALL, assert_dcnv3_matches_fallback, assert_rel_close,
                     dcnv3_golden_kwargs, dcnv3_random_operands, golden_cases, golden_index,
                     golden_tol, load_golden, precision)
from internimage_jax import ops
from pallas_kernels.dcnv3 import DCNv3Params, api
from pallas_kernels.dcnv3.config import INTERPRET_CONFIG, MosaicConfig, TritonConfig
from pallas_kernels.dcnv3.mosaic import dcnv3_mosaic
from pallas_kernels.dcnv3.shapes import stage_shapes

BACKENDS = ("xla", "pallas_triton", "pallas_mosaic")
KERNELS = ("pallas_triton", "pallas_mosaic")
NATIVE = {"pallas_triton": "gpu", "pallas_mosaic": "tpu"}

# Small Mosaic blocks keep the interpreter's padded work down; the TPU default (what
# the public API runs) is larger.
SMALL = MosaicConfig(block_q=8, chunk=4)


def _skip_unless_runnable(implementation: str) -> None:
  """Skips a backend that cannot run here: a kernel off its own platform and the CPU
  (its interpreter), or the Triton kernels on a jax without the Pallas Triton backend."""
  platform = jax.default_backend()
  if implementation in NATIVE and platform not in (NATIVE[implementation], "cpu"):
    pytest.skip(f"{implementation} runs on {NATIVE[implementation]} (interpreted on cpu), "
                f"not on {platform}")
  if implementation == "pallas_triton":
    _triton()


def _triton():
  """The Triton kernel module; skips where this jax has no Pallas Triton backend."""
  module, why = api.triton_kernels()
  if module is None:
    pytest.skip(f"this jax has no Pallas Triton backend ({why})")
  return module


@pytest.fixture(params=BACKENDS)
def implementation(request) -> str:
  """Every backend, as ``dcnv3(..., implementation=...)`` names it."""
  _skip_unless_runnable(request.param)
  return request.param


@pytest.fixture(params=KERNELS)
def kernel(request) -> str:
  """The Pallas kernels, each checked against the fallback."""
  _skip_unless_runnable(request.param)
  return request.param


def _dcnv3(implementation: str, *, mosaic_config: MosaicConfig = SMALL, **kwargs):
  """``(x, offset, mask) -> out``: ``ops.dcnv3`` with ``implementation``, except the
  Mosaic kernels on a CPU, interpreted with ``mosaic_config`` blocks (the public API
  would interpret the TPU default, larger blocks; it is run in
  ``test_public_api_and_bfloat16``)."""
  if implementation == "pallas_mosaic" and jax.default_backend() == "cpu":
    params = DCNv3Params.create(**kwargs)
    return lambda x, o, m: dcnv3_mosaic(jnp.asarray(x), jnp.asarray(o), jnp.asarray(m), params,
                                        mosaic_config, pltpu.InterpretParams())
  return functools.partial(ops.dcnv3, implementation=implementation, **kwargs)


def _operands(shape=(2, 6, 7), group=2, channels=8, points=9, seed=0, offset_std=1.5):
  """Random float32 ``(x, offset, mask)`` for a stride-1, same-size output."""
  return dcnv3_random_operands(shape, channels, group, points, shape[1:], seed=seed,
                               offset_std=offset_std)[:3]


# One small image and one group (the Mosaic interpreter's time grows with both): the
# problem of several tests and of the "far" fallback case, so that the Triton kernels
# compiled for one of them (eagerly: cached by shape) serve the others.
SMALL_PROBLEM = dict(shape=(1, 4, 4), group=1, channels=16)


# ================================================================ every backend: goldens
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", golden_cases("dcnv3_core"))
def test_golden_core(case, dtype, implementation):
  """Output and the three gradients against the CUDA op's goldens."""
  if implementation == "pallas_mosaic" and dtype == np.float64:
    pytest.skip("TPUs have no float64 and JAX's TPU interpreter refuses it (itemsize > 4)")
  g = load_golden(case)
  kwargs = dcnv3_golden_kwargs(golden_index()[case])
  with precision(dtype):
    x, offset, mask, grad_out = (jnp.asarray(g[k], dtype)
                                 for k in ("input", "offset", "mask", "grad_output"))
    out, vjp = jax.vjp(_dcnv3(implementation, **kwargs), x, offset, mask)
    grads = vjp(grad_out)
    assert out.dtype == dtype
    tol = golden_tol(dtype)
    assert_rel_close(out, g["output"], tol, "output")
    for grad, key in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
      assert grad.dtype == dtype
      assert_rel_close(grad, g[key], tol, key)


# ====================================================== every backend: hand-computed cases
def test_integer_offset_is_a_shift(implementation):
  x, _, _ = _operands(group=2, points=1)
  n, h, w, c = x.shape
  offset = np.zeros((n, h, w, 2 * 1 * 2), np.float32)
  offset[..., 0::2] = 1.0  # x by +1
  offset[..., 1::2] = 2.0  # y by +2
  mask = np.ones((n, h, w, 2), np.float32)
  out = _dcnv3(implementation, kernel_size=1, pad=0, group=2)(x, offset, mask)
  want = np.zeros_like(x)
  want[:, : h - 2, : w - 1] = x[:, 2:, 1:]
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_one_hot_mask_picks_one_kernel_point(implementation):
  x, _, _ = _operands(**SMALL_PROBLEM)
  n, h, w, c = x.shape
  offset = np.zeros((n, h, w, 9 * 2), np.float32)
  mask = np.zeros((n, h, w, 9), np.float32)
  # Points run x-outer, y-inner: p = ix * 3 + iy; ix=2, iy=0 is (dx, dy) = (+1, -1).
  mask[..., 2 * 3 + 0] = 1.0
  out = _dcnv3(implementation, group=1)(x, offset, mask)
  want = np.zeros_like(x)
  want[:, 1:, : w - 1] = x[:, : h - 1, 1:]
  np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)


def test_point_fully_outside_contributes_zero(implementation):
  x, offset, mask = _operands(**SMALL_PROBLEM)
  far = np.full_like(offset, -100.0)
  op = _dcnv3(implementation, group=1)
  out, vjp = jax.vjp(lambda a: op(a, far, mask), jnp.asarray(x))
  np.testing.assert_array_equal(out, 0.0)
  (grad_x,) = vjp(jnp.ones_like(out))
  np.testing.assert_array_equal(grad_x, 0.0)


def test_point_half_outside_picks_up_edge_share(implementation):
  x, _, _ = _operands(shape=(1, 3, 4), group=1, channels=2, points=1)
  offset = np.zeros((1, 3, 4, 2), np.float32)
  offset[..., 0] = -0.5 - np.arange(4)[None, None, :]  # px = -0.5 for every column
  offset[..., 1] = 0.25  # py = i + 0.25
  mask = np.ones((1, 3, 4, 1), np.float32)
  out = np.asarray(_dcnv3(implementation, kernel_size=1, pad=0, group=1)(x, offset, mask))
  rows = np.concatenate([x[0, 1:, 0], np.zeros((1, 2), np.float32)])  # row i+1 (zero past end)
  want = 0.5 * (0.75 * x[0, :, 0] + 0.25 * rows)  # half of column 0, bilinear in y
  for j in range(4):
    np.testing.assert_allclose(out[0, :, j], want, rtol=1e-6, atol=1e-6)


def test_offset_scale_scales_grid_and_offsets(implementation):
  """With offset_scale s the sample sits at centre + s * (grid + offset)."""
  x, _, _ = _operands(shape=(1, 6, 7), group=1, channels=3)
  offset = np.zeros((1, 6, 7, 18), np.float32)
  mask = np.zeros((1, 6, 7, 9), np.float32)
  mask[..., 2 * 3 + 2] = 1.0  # (dx, dy) = (+1, +1)
  offset[..., (2 * 3 + 2) * 2] = 0.5  # learned x offset of that point
  out = np.asarray(_dcnv3(implementation, group=1, offset_scale=2.0)(x, offset, mask))
  # x: j + 2 * (1 + 0.5) = j + 3; y: i + 2.
  np.testing.assert_allclose(out[0, :4, :4], x[0, 2:, 3:], atol=1e-6)


def test_remove_center_drops_the_middle_point(implementation):
  x, offset, mask = _operands(**SMALL_PROBLEM)
  g = SMALL_PROBLEM["group"]
  # Same sampling with the centre point's mask zeroed equals remove_center's P = 8.
  mask9 = mask.reshape(*mask.shape[:3], g, 9).copy()
  mask9[..., 4] = 0.0
  keep = [p for p in range(9) if p != 4]
  offset9 = offset.reshape(*offset.shape[:3], g, 9, 2)
  mask8 = mask9[..., keep].reshape(*mask.shape[:3], g * 8)
  offset8 = offset9[..., keep, :].reshape(*offset.shape[:3], g * 16)
  full = _dcnv3(implementation, group=g)(x, offset, mask9.reshape(mask.shape))
  removed = _dcnv3(implementation, group=g, remove_center=True)(x, offset8, mask8)
  np.testing.assert_allclose(removed, full, atol=1e-5)


# ============================================== every backend: dtypes, transforms, errors
def test_public_api_and_bfloat16(implementation):
  """``ops.dcnv3(..., implementation=...)`` itself equals the fallback (for the Mosaic
  kernels: with their TPU block configuration), and bfloat16 operands give a bfloat16
  result (8 bits of mantissa) summed in float32, and bfloat16 gradients."""
  x, offset, mask = _operands(**SMALL_PROBLEM)
  want = ops.dcnv3(x, offset, mask, group=1, implementation="xla")
  if implementation != "xla":
    public = ops.dcnv3(x, offset, mask, group=1, implementation=implementation)
    np.testing.assert_allclose(public, want, rtol=1e-5, atol=1e-5)
  xb, ob, mb = (jnp.asarray(a, jnp.bfloat16) for a in (x, offset, mask))
  out, vjp = jax.vjp(_dcnv3(implementation, group=1), xb, ob, mb)
  assert out.dtype == jnp.bfloat16
  assert_rel_close(out, want, 2e-2, "bf16 output")
  grads = vjp(jnp.ones_like(out))
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 3


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=(3, 5), stride=(2, 1), pad=(1, 2), dilation=(2, 1)),
    dict(kernel_size=5, stride=3, pad=0, dilation=1, remove_center=True),
    dict(kernel_size=(1, 3), stride=1, pad=(0, 1), offset_scale=0.5),
], ids=["rect", "k5s3", "1x3"])
def test_gradients_match_finite_differences_x64(kwargs, implementation):
  if implementation == "pallas_mosaic":
    pytest.skip("TPUs have no float64 and JAX's TPU interpreter refuses it (itemsize > 4)")
  params = DCNv3Params.create(group=2, **kwargs)
  with precision(np.float64):
    n, h, w = 1, 9, 8
    ho, wo = params.output_size(h, w)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((n, h, w, 6)))
    # Keep sampling positions away from integers, where bilinear weights have kinks.
    offset = jnp.asarray(0.3 + 0.4 * rng.random((n, ho, wo, 2 * params.num_points * 2)))
    mask = jnp.asarray(rng.random((n, ho, wo, 2 * params.num_points)))
    op = _dcnv3(implementation, group=2, **kwargs)
    check_grads(op, (x, offset, mask), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)


def test_vmap_and_jit_agree_with_a_loop(implementation, request):
  if implementation == "pallas_mosaic":  # strict: passes once the kernels batch
    request.applymarker(pytest.mark.xfail(
        raises=ValueError, strict=True,
        reason="vmap of the Mosaic kernels: the batched pallas_call has one grid axis more "
               "than its dimension_semantics (the TPU interpreter's safe_zip fails)"))
  x, offset, mask = _operands(**SMALL_PROBLEM)
  xs, offs, masks = (jnp.asarray(np.stack([a, a[::-1] * 0.5])) for a in (x, offset, mask))
  op = _dcnv3(implementation, group=1)

  @jax.jit
  def batched(xs):  # the output and the gradient of sum(out ** 2)
    out, vjp = jax.vjp(lambda a: jax.vmap(op)(a, offs, masks), xs)
    return out, vjp(2 * out)[0]

  out, grads = batched(xs)
  for i in range(2):
    np.testing.assert_allclose(out[i], op(xs[i], offs[i], masks[i]), rtol=1e-6, atol=1e-6)
  assert grads.shape == xs.shape and bool(jnp.all(jnp.isfinite(grads)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(group=3), "divisible by group"),
    (dict(group=2, kernel_size=4, remove_center=True), "odd square kernel"),
    (dict(group=2, kernel_size=(3, 5), remove_center=True), "odd square kernel"),
    (dict(group=2, stride=0), "stride"),
    (dict(group=2, pad=-1), "pad"),
    (dict(group=2, implementation="cuda"), "unknown implementation"),
    (dict(group=2, implementation="mosaic"), "unknown implementation"),
    (dict(group=2, kernel_size=(3, 3, 3)), "pair"),
])
def test_bad_arguments_are_named(kwargs, match, implementation):
  x, offset, mask = _operands(channels=8, group=2)
  with pytest.raises((ValueError, TypeError), match=match):
    ops.dcnv3(x, offset, mask, **{"implementation": implementation, **kwargs})


def test_bad_shapes_are_named(implementation):
  x, offset, mask = _operands(channels=8, group=2)
  op = functools.partial(ops.dcnv3, group=2, implementation=implementation)
  with pytest.raises(ValueError, match="offset must have shape"):
    op(x, offset[..., :-2], mask)
  with pytest.raises(ValueError, match="mask must have shape"):
    op(x, offset, mask[:, :-1])
  with pytest.raises(ValueError, match="rank 4"):
    op(x[0], offset, mask)
  with pytest.raises(ValueError, match="too small"):
    op(x[:, :2, :2], offset, mask, kernel_size=5, pad=0)


# ==================================================== the kernels against the fallback
# (shape, channels, kwargs, offset_std, the Mosaic kernels' blocks)
FALLBACK_CASES = {
    # odd, non-square; 12 channels per group (the Triton kernels pad them to 16)
    "odd": ((1, 5, 7), 24, dict(group=2), 2.0, SMALL),
    # 8 channels per group; several Mosaic blocks per (image, group)
    "stride2": ((2, 6, 6), 16, dict(group=2, stride=2, pad=0, kernel_size=3), 1.0,
                MosaicConfig(block_q=16, chunk=8)),
    "k5-dil-rc": ((1, 9, 8), 32, dict(group=1, kernel_size=5, pad=2, dilation=(2, 1),
                                      remove_center=True), 1.5, SMALL),
    "far": ((1, 4, 4), 16, dict(group=1), 40.0, SMALL),  # offsets far outside the image
}


@pytest.mark.parametrize("case", list(FALLBACK_CASES))
def test_kernel_matches_the_fallback(case, kernel):
  """Output and all three gradients equal the fallback's."""
  shape, channels, kwargs, offset_std, mosaic_config = FALLBACK_CASES[case]
  params = DCNv3Params.create(**kwargs)
  out_hw = params.output_size(shape[1], shape[2])
  arrays = dcnv3_random_operands(shape, channels, params.group, params.num_points, out_hw,
                                 offset_std=offset_std)
  assert_dcnv3_matches_fallback(_dcnv3(kernel, mosaic_config=mosaic_config, **kwargs), kwargs,
                                *arrays)


# ======================================= the choice behind "auto" and "pallas"
def test_auto_and_pallas_name_the_fallback_and_the_triton_kernels_on_a_cpu(monkeypatch):
  """On a CPU ``"auto"`` (the default) runs the fallback and ``"pallas"`` the Triton
  kernels, interpreted with one pixel-group per program."""
  if jax.default_backend() != "cpu":
    pytest.skip("the choice on a CPU")
  triton = _triton()
  calls = []

  def spy(name):
    def op(x, offset, mask, params, *how):
      calls.append((name, how))
      return jnp.zeros_like(x)
    return op

  monkeypatch.setattr(api, "dcnv3_xla", spy("xla"))
  monkeypatch.setattr(api, "dcnv3_mosaic", spy("mosaic"))
  monkeypatch.setattr(triton, "dcnv3_triton", spy("triton"))
  x, offset, mask = _operands(**SMALL_PROBLEM)
  ops.dcnv3(x, offset, mask, group=1)
  assert calls == [("xla", ())]
  calls.clear()
  ops.dcnv3(x, offset, mask, group=1, implementation="pallas")
  assert {name for name, _ in calls} == {"triton"}
  assert ("triton", (INTERPRET_CONFIG, True)) in calls


def test_auto_picks_the_triton_kernels_on_gpus_where_it_knows_the_placement(monkeypatch):
  assert api._auto("cpu", jnp.float32, placed=False) == "xla"
  assert api._auto("tpu", jnp.float32, placed=True) == "xla"
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert api._auto("gpu", jnp.float32, placed=False) == "pallas_triton"
  assert api._auto("gpu", jnp.bfloat16, placed=False) == "pallas_triton"
  assert api._auto("gpu", jnp.float64, placed=False) == "xla"
  monkeypatch.setattr(jax, "device_count", lambda: 8)
  # Operands split by jit's in_shardings alone: a custom call would gather them.
  assert api._auto("gpu", jnp.float32, placed=False) == "xla"
  # A mesh known (set_mesh, typed operands, mesh=/batch_axes=): per device, any count,
  # as in each process of a multi-process job.
  assert api._auto("gpu", jnp.float32, placed=True) == "pallas_triton"


@pytest.fixture
def without_triton(monkeypatch):
  """This jax without the Pallas Triton backend (as a release that removes it)."""
  from jax.experimental import pallas

  monkeypatch.delattr(pallas, "triton", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delitem(sys.modules, "pallas_kernels.dcnv3.triton", raising=False)
  monkeypatch.setattr(api, "_WARNED_NO_TRITON", False)
  api.triton_kernels.cache_clear()
  yield api
  api.triton_kernels.cache_clear()


def test_without_the_triton_backend_auto_falls_back_with_one_warning(without_triton, monkeypatch):
  module, why = api.triton_kernels()
  assert module is None and "jax.experimental.pallas.triton" in why
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  with pytest.warns(RuntimeWarning, match="no Pallas Triton backend.*fallback"):
    assert api._auto("gpu", jnp.float32, placed=False) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # once only
    assert api._auto("gpu", jnp.float32, placed=True) == "xla"


def test_without_the_triton_backend_pallas_on_a_gpu_is_a_clear_error(without_triton, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  x, offset, mask, _ = dcnv3_random_operands((1, 4, 4), 16, 1, 9, (4, 4))
  with pytest.raises(NotImplementedError,
                     match="'pallas' needs the Pallas Triton backend.*implementation='xla'"):
    ops.dcnv3(x, offset, mask, group=1, implementation="pallas")
  # The fallback still runs, and the module imports nothing of the backend.
  out = ops.dcnv3(x, offset, mask, group=1, implementation="xla")
  assert out.shape == x.shape


# ================================================================= the XLA fallback only
def test_fallback_keeps_no_per_corner_copies_for_backward():
  """Forward+backward temporaries stay near the input size, far below P*4 copies."""
  shape = stage_shapes("internimage_t", batch=8)[0]
  n, s, c, g = shape.batch, shape.size, shape.channels, shape.group
  x = jax.ShapeDtypeStruct((n, s, s, c), jnp.float32)
  offset = jax.ShapeDtypeStruct((n, s, s, g * 18), jnp.float32)
  mask = jax.ShapeDtypeStruct((n, s, s, g * 9), jnp.float32)

  def fwd_bwd(x, offset, mask):
    out, vjp = jax.vjp(functools.partial(ops.dcnv3, group=g, implementation="xla"),
                       x, offset, mask)
    return vjp(out)

  stats = jax.jit(fwd_bwd).lower(x, offset, mask).compile().memory_analysis()
  input_bytes = n * s * s * c * 4
  # Keeping the gathered corners alive would need 4 * 9 = 36 input-sized copies.
  assert stats.temp_size_in_bytes < 12 * input_bytes, stats


# ============================================================== the Triton kernels only
CUDA_TARGET = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=CUDA_DEVICE)


@pytest.mark.parametrize("shape,group,channels,config", [
    ((2, 5, 6), 2, 32, TritonConfig(block_q=16, num_warps=4)),  # runs of one row
    ((2, 8, 8), 2, 32, TritonConfig(block_q=16, num_warps=4, tile_rows=2)),  # 2 x 4 pixels
    ((2, 8, 8), 7, 56, TritonConfig(block_q=32, num_warps=4, tile_rows=2)),  # straddling tiles
], ids=["rows", "tiles", "group7"])
def test_triton_wide_blocks_match_in_interpret_mode_where_no_atomics_are_involved(
    shape, group, channels, config):
  """block_q > 1: the forward and the offset/mask gradients (no atomics) are exact."""
  triton = _triton()
  params = DCNv3Params.create(group=group)
  x, offset, mask, grad_out = dcnv3_random_operands(shape, channels, group, 9, shape[1:], seed=3)
  out, vjp = jax.vjp(lambda a, b, c: triton.dcnv3_triton(a, b, c, params, config, True),
                     x, offset, mask)
  _, grad_offset, grad_mask = vjp(grad_out)
  want_out, want_vjp = jax.vjp(functools.partial(ops.dcnv3, group=group, implementation="xla"),
                               x, offset, mask)
  _, want_offset, want_mask = want_vjp(grad_out)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_offset, want_offset, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_mask, want_mask, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tile_rows", [2, 3])
@pytest.mark.parametrize("shape,channels,kwargs", [
    ((2, 7, 5), 24, dict(group=3)),  # tiles overhang both edges; 8 channels padded
    ((1, 9, 8), 16, dict(group=2, stride=2, pad=0)),
], ids=["odd", "stride2"])
def test_triton_pixel_tiles_match_the_fallback(shape, channels, kwargs, tile_rows):
  """Programs walking tiles of pixels (tile_rows > 1) compute the same operator; one
  pixel-group per program, so interpret mode checks all three gradients exactly."""
  triton = _triton()
  params = DCNv3Params.create(**kwargs)
  out_hw = params.output_size(shape[1], shape[2])
  config = TritonConfig(block_q=1, num_warps=1, tile_rows=tile_rows)
  assert_dcnv3_matches_fallback(
      lambda a, b, c: triton.dcnv3_triton(a, b, c, params, config, True), kwargs,
      *dcnv3_random_operands(shape, channels, params.group, params.num_points, out_hw))


def test_triton_backward_without_the_scatter_for_benchmarks():
  """``grad_x=False`` (the benchmarks' measure of the atomics' share) leaves the input
  gradient zero and the other two unchanged."""
  triton = _triton()
  params = DCNv3Params.create(group=2)
  x, offset, mask, grad_out = dcnv3_random_operands((1, 5, 6), 32, 2, 9, (5, 6), seed=2)
  kw = dict(params=params, config=INTERPRET_CONFIG, interpret=True)
  full = triton.backward(x, offset, mask, grad_out, **kw)
  partial = triton.backward(x, offset, mask, grad_out, grad_x=False, **kw)
  assert not np.any(np.asarray(partial[0]))
  np.testing.assert_allclose(partial[1], full[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(partial[2], full[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,kwargs", [
    (jnp.float32, {}), (jnp.bfloat16, {}),
    # 24 points: the kernels loop over points instead of unrolling them.
    (jnp.float32, dict(kernel_size=5, pad=2, dilation=(2, 1), remove_center=True)),
], ids=["f32", "bf16", "f32-k5-looped"])
def test_triton_kernels_lower_for_cuda(dtype, kwargs):
  """Export for CUDA lowers both kernels to Triton without a GPU on this machine."""
  triton = _triton()
  shape = stage_shapes("internimage_t", batch=2)[0]
  s, c, g = shape.size, shape.channels, shape.group
  params = DCNv3Params.create(group=g, **kwargs)
  p, (ho, wo) = params.num_points, params.output_size(s, s)
  args = (jax.ShapeDtypeStruct((2, s, s, c), dtype),
          jax.ShapeDtypeStruct((2, ho, wo, g * p * 2), dtype),
          jax.ShapeDtypeStruct((2, ho, wo, g * p), dtype))
  op = lambda x, o, m: triton.dcnv3_triton(x, o, m, params, TritonConfig(), False)
  loss = lambda x, o, m: jnp.sum(op(x, o, m).astype(jnp.float32))
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  for fn, name in ((op, "dcnv3_forward"), (jax.grad(loss, argnums=(0, 1, 2)), "dcnv3_backward")):
    with jax.sharding.use_abstract_mesh(CUDA_TARGET):
      exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert TRITON_CALL in text and name in text


@pytest.mark.parametrize("kwargs", [dict(block_q=48), dict(num_warps=3), dict(num_stages=0),
                                    dict(block_q=0), dict(tile_rows=0), dict(tile_rows=True)])
def test_triton_config_validates(kwargs):
  with pytest.raises(ValueError, match="TritonConfig"):
    TritonConfig(**kwargs)


def test_triton_launch_configuration_comes_from_the_tuned_table(monkeypatch):
  from pallas_kernels.dcnv3 import config

  assert config.triton_config("forward", 16, jnp.float32) == config.DEFAULT_TRITON
  tuned = TritonConfig(block_q=128, num_warps=8, tile_rows=2)
  monkeypatch.setitem(config.TUNED_TRITON, ("backward", 16, "bfloat16"), tuned)
  assert config.triton_config("backward", 16, jnp.bfloat16) == tuned
  assert config.triton_config("forward", 16, jnp.bfloat16) == config.DEFAULT_TRITON
  with pytest.raises(ValueError, match="kernel"):
    config.triton_config("sideways", 16, jnp.float32)


# ============================================================== the Mosaic kernels only
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_mosaic_kernels_lower_for_tpu(dtype):
  """Export for TPU lowers both kernels to Mosaic without a TPU on this machine."""
  shape = stage_shapes("internimage_t", batch=2)[0]
  s, c, g = shape.size, shape.channels, shape.group
  args = (jax.ShapeDtypeStruct((2, s, s, c), dtype),
          jax.ShapeDtypeStruct((2, s, s, g * 18), dtype),
          jax.ShapeDtypeStruct((2, s, s, g * 9), dtype))
  params = DCNv3Params.create(group=g)
  op = lambda x, o, m: dcnv3_mosaic(x, o, m, params, MosaicConfig(), False)
  loss = lambda x, o, m: jnp.sum(op(x, o, m).astype(jnp.float32))
  for fn, name in ((op, "dcnv3_forward_mosaic"),
                   (jax.grad(loss, argnums=(0, 1, 2)), "dcnv3_backward_mosaic")):
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in text and name in text


@pytest.mark.parametrize("kwargs", [dict(block_q=12), dict(block_q=0), dict(chunk=0),
                                    dict(block_q=16, chunk=3)])
def test_mosaic_config_validates(kwargs):
  with pytest.raises(ValueError, match="MosaicConfig"):
    MosaicConfig(**kwargs)


def test_mosaic_kernels_refuse_float64():
  _skip_unless_runnable("pallas_mosaic")
  x, offset, mask, _ = dcnv3_random_operands((1, 4, 4), 16, 1, 9, (4, 4))
  with precision(np.float64):
    x64 = jnp.asarray(x, jnp.float64)
    with pytest.raises(TypeError, match="take float32 or bfloat16, x is float64"):
      ops.dcnv3(x64, offset, mask, group=1, implementation="pallas_mosaic")
