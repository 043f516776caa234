"""Pallas Triton DCNv3 kernels on CPU: interpret mode against the goldens and the
XLA fallback, and lowering for CUDA through ``jax.export`` (no GPU needed)."""

from __future__ import annotations

import functools
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from helpers import (CUDA_DEVICE, TRITON_CALL, assert_dcnv3_matches_fallback, assert_rel_close,
                     dcnv3_golden_kwargs, dcnv3_random_operands, golden_cases, golden_index,
                     golden_tol, load_golden, precision)
from internimage_jax import ops
from pallas_kernels.dcnv3 import DCNv3Params
from pallas_kernels.dcnv3.config import INTERPRET_CONFIG, TritonConfig
from pallas_kernels.dcnv3.shapes import stage_shapes
from pallas_kernels.dcnv3.triton import dcnv3_triton

CUDA_TARGET = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=CUDA_DEVICE)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", golden_cases("dcnv3_core"))
def test_interpret_matches_golden(case, dtype):
  g = load_golden(case)
  kwargs = dcnv3_golden_kwargs(golden_index()[case])
  with precision(dtype):
    x, offset, mask, grad_out = (jnp.asarray(g[k], dtype)
                                 for k in ("input", "offset", "mask", "grad_output"))
    op = functools.partial(ops.dcnv3, implementation="pallas", **kwargs)
    out, vjp = jax.vjp(op, x, offset, mask)
    grads = vjp(grad_out)
    tol = golden_tol(dtype)
    assert_rel_close(out, g["output"], tol, "output")
    for grad, key in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
      assert grad.dtype == dtype
      assert_rel_close(grad, g[key], tol, key)


@pytest.mark.parametrize("shape,channels,kwargs,offset_std", [
    ((1, 5, 7), 24, dict(group=2), 2.0),  # odd, non-square; 12 channels/group: padded to 16
    ((2, 6, 6), 16, dict(group=2, stride=2, pad=0, kernel_size=3), 1.0),  # 8 channels/group
    ((1, 9, 8), 32, dict(group=1, kernel_size=5, pad=2, dilation=(2, 1), remove_center=True), 1.5),
    ((1, 4, 4), 16, dict(group=1), 40.0),  # offsets far outside the image
], ids=["odd-padded", "stride2", "k5-dil-rc", "far"])
def test_interpret_matches_the_fallback(shape, channels, kwargs, offset_std):
  params = DCNv3Params.create(**kwargs)
  out_hw = params.output_size(shape[1], shape[2])
  arrays = dcnv3_random_operands(shape, channels, params.group, params.num_points, out_hw,
                   offset_std=offset_std)
  assert_dcnv3_matches_fallback(functools.partial(ops.dcnv3, implementation="pallas", **kwargs),
                          kwargs, *arrays)


@pytest.mark.parametrize("shape,group,channels,config", [
    ((2, 5, 6), 2, 32, TritonConfig(block_q=16, num_warps=4)),  # runs of one row
    ((2, 8, 8), 2, 32, TritonConfig(block_q=16, num_warps=4, tile_rows=2)),  # 2 x 4 pixels
    ((2, 8, 8), 7, 56, TritonConfig(block_q=32, num_warps=4, tile_rows=2)),  # straddling tiles
], ids=["rows", "tiles", "group7"])
def test_wide_blocks_match_in_interpret_mode_where_no_atomics_are_involved(
    shape, group, channels, config):
  """block_q > 1: the forward and the offset/mask gradients (no atomics) are exact."""
  params = DCNv3Params.create(group=group)
  x, offset, mask, grad_out = dcnv3_random_operands(shape, channels, group, 9, shape[1:], seed=3)
  out, vjp = jax.vjp(lambda a, b, c: dcnv3_triton(a, b, c, params, config, True), x, offset, mask)
  _, grad_offset, grad_mask = vjp(grad_out)
  want_out, want_vjp = jax.vjp(functools.partial(ops.dcnv3, group=group, implementation="xla"),
                               x, offset, mask)
  _, want_offset, want_mask = want_vjp(grad_out)
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_offset, want_offset, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grad_mask, want_mask, rtol=1e-5, atol=1e-5)


def test_bfloat16_in_interpret_mode():
  x, offset, mask, _ = dcnv3_random_operands((1, 6, 6), 32, 2, 9, (6, 6))
  want = ops.dcnv3(x, offset, mask, group=2, implementation="xla")
  xb, ob, mb = (jnp.asarray(a, jnp.bfloat16) for a in (x, offset, mask))
  out = ops.dcnv3(xb, ob, mb, group=2, implementation="pallas")
  assert out.dtype == jnp.bfloat16
  assert_rel_close(out, want, 2e-2, "bf16")


@pytest.mark.parametrize("dtype,kwargs", [
    (jnp.float32, {}), (jnp.bfloat16, {}),
    # 24 points: the kernels loop over points instead of unrolling them.
    (jnp.float32, dict(kernel_size=5, pad=2, dilation=(2, 1), remove_center=True)),
], ids=["f32", "bf16", "f32-k5-looped"])
def test_kernels_lower_for_cuda(dtype, kwargs):
  """Export for CUDA lowers both kernels to Triton without a GPU on this machine."""
  shape = stage_shapes("internimage_t", batch=2)[0]
  s, c, g = shape.size, shape.channels, shape.group
  params = DCNv3Params.create(group=g, **kwargs)
  p, (ho, wo) = params.num_points, params.output_size(s, s)
  args = (jax.ShapeDtypeStruct((2, s, s, c), dtype),
          jax.ShapeDtypeStruct((2, ho, wo, g * p * 2), dtype),
          jax.ShapeDtypeStruct((2, ho, wo, g * p), dtype))
  op = lambda x, o, m: dcnv3_triton(x, o, m, params, TritonConfig(), False)
  loss = lambda x, o, m: jnp.sum(op(x, o, m).astype(jnp.float32))
  checks = [export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  for fn, kernel in ((op, "dcnv3_forward"), (jax.grad(loss, argnums=(0, 1, 2)), "dcnv3_backward")):
    with jax.sharding.use_abstract_mesh(CUDA_TARGET):
      exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",)
    assert TRITON_CALL in text and kernel in text


@pytest.mark.parametrize("kwargs", [dict(block_q=48), dict(num_warps=3), dict(num_stages=0),
                                    dict(block_q=0), dict(tile_rows=0), dict(tile_rows=True)])
def test_config_validates(kwargs):
  with pytest.raises(ValueError, match="TritonConfig"):
    TritonConfig(**kwargs)


def test_launch_configuration_comes_from_the_tuned_table(monkeypatch):
  from pallas_kernels.dcnv3 import config

  assert config.triton_config("forward", 16, jnp.float32) == config.DEFAULT_TRITON
  tuned = TritonConfig(block_q=128, num_warps=8, tile_rows=2)
  monkeypatch.setitem(config.TUNED_TRITON, ("backward", 16, "bfloat16"), tuned)
  assert config.triton_config("backward", 16, jnp.bfloat16) == tuned
  assert config.triton_config("forward", 16, jnp.bfloat16) == config.DEFAULT_TRITON
  with pytest.raises(ValueError, match="kernel"):
    config.triton_config("sideways", 16, jnp.float32)


@pytest.mark.parametrize("tile_rows", [2, 3])
@pytest.mark.parametrize("shape,channels,kwargs", [
    ((2, 7, 5), 24, dict(group=3)),  # tiles overhang both edges; 8 channels padded
    ((1, 9, 8), 16, dict(group=2, stride=2, pad=0)),
], ids=["odd", "stride2"])
def test_pixel_tiles_match_the_fallback(shape, channels, kwargs, tile_rows):
  """Programs walking tiles of pixels (tile_rows > 1) compute the same operator; one
  pixel-group per program, so interpret mode checks all three gradients exactly."""
  params = DCNv3Params.create(**kwargs)
  out_hw = params.output_size(shape[1], shape[2])
  config = TritonConfig(block_q=1, num_warps=1, tile_rows=tile_rows)
  assert_dcnv3_matches_fallback(lambda a, b, c: dcnv3_triton(a, b, c, params, config, True), kwargs,
                          *dcnv3_random_operands(shape, channels, params.group, params.num_points, out_hw))


def test_backward_without_the_scatter_for_benchmarks():
  """``grad_x=False`` (the benchmarks' measure of the atomics' share) leaves the input
  gradient zero and the other two unchanged."""
  from pallas_kernels.dcnv3 import triton

  params = DCNv3Params.create(group=2)
  x, offset, mask, grad_out = dcnv3_random_operands((1, 5, 6), 32, 2, 9, (5, 6), seed=2)
  kw = dict(params=params, config=INTERPRET_CONFIG, interpret=True)
  full = triton.backward(x, offset, mask, grad_out, **kw)
  partial = triton.backward(x, offset, mask, grad_out, grad_x=False, **kw)
  assert not np.any(np.asarray(partial[0]))
  np.testing.assert_allclose(partial[1], full[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(partial[2], full[2], rtol=1e-5, atol=1e-6)


def test_auto_picks_the_kernel_on_gpus_where_it_knows_the_placement(monkeypatch):
  from pallas_kernels.dcnv3 import api

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

  from pallas_kernels.dcnv3 import api

  monkeypatch.delattr(pallas, "triton", raising=False)
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delitem(sys.modules, "pallas_kernels.dcnv3.triton", raising=False)
  monkeypatch.setattr(api, "_WARNED_NO_TRITON", False)
  api.triton_kernels.cache_clear()
  yield api
  api.triton_kernels.cache_clear()


def test_without_the_triton_backend_auto_falls_back_with_one_warning(without_triton, monkeypatch):
  api = without_triton
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
