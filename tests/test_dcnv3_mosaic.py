"""Pallas Mosaic (TPU) DCNv3 kernels on CPU: interpret mode (``pltpu.InterpretParams``)
against the goldens and the XLA fallback, and lowering for TPU through ``jax.export``."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu

from helpers import (assert_dcnv3_matches_fallback, assert_rel_close, dcnv3_golden_kwargs,
                     dcnv3_random_operands, golden_cases, golden_index, golden_tol, load_golden,
                     precision)
from internimage_jax import ops
from pallas_kernels.dcnv3 import DCNv3Params
from pallas_kernels.dcnv3.config import MosaicConfig
from pallas_kernels.dcnv3.mosaic import dcnv3_mosaic
from pallas_kernels.dcnv3.shapes import stage_shapes

# Small blocks keep the interpreter's padded work down; the TPU default is larger.
SMALL = MosaicConfig(block_q=8, chunk=4)


def _mosaic(params: DCNv3Params, config: MosaicConfig = SMALL):
  return lambda x, o, m: dcnv3_mosaic(x, o, m, params, config, pltpu.InterpretParams())


# float32 only: TPUs have no float64 and JAX's TPU interpreter refuses it (itemsize > 4).
@pytest.mark.parametrize("dtype", [np.float32], ids=["f32"])
@pytest.mark.parametrize("case", golden_cases("dcnv3_core"))
def test_interpret_matches_golden(case, dtype):
  g = load_golden(case)
  params = DCNv3Params.create(**dcnv3_golden_kwargs(golden_index()[case]))
  with precision(dtype):
    x, offset, mask, grad_out = (jnp.asarray(g[k], dtype)
                                 for k in ("input", "offset", "mask", "grad_output"))
    out, vjp = jax.vjp(_mosaic(params), x, offset, mask)
    grads = vjp(grad_out)
    tol = golden_tol(dtype)
    assert out.dtype == dtype
    assert_rel_close(out, g["output"], tol, "output")
    for grad, key in zip(grads, ("grad_input", "grad_offset", "grad_mask")):
      assert grad.dtype == dtype
      assert_rel_close(grad, g[key], tol, key)


@pytest.mark.parametrize("shape,channels,kwargs,offset_std,config", [
    ((1, 5, 7), 24, dict(group=2), 2.0, SMALL),  # odd, non-square, 12 channels per group
    ((2, 6, 6), 16, dict(group=2, stride=2, pad=0), 1.0, MosaicConfig(block_q=16, chunk=8)),
    ((1, 9, 8), 32, dict(group=1, kernel_size=5, pad=2, dilation=(2, 1), remove_center=True),
     1.5, SMALL),
    ((1, 4, 4), 16, dict(group=1), 40.0, SMALL),  # offsets far outside the image
], ids=["odd", "stride2-blocks", "k5-dil-rc", "far"])
def test_interpret_matches_the_fallback(shape, channels, kwargs, offset_std, config):
  params = DCNv3Params.create(**kwargs)
  out_hw = params.output_size(shape[1], shape[2])
  assert_dcnv3_matches_fallback(_mosaic(params, config), kwargs,
                          *dcnv3_random_operands(shape, channels, params.group, params.num_points, out_hw,
                                   offset_std=offset_std))


def test_public_api_selects_the_mosaic_kernels():
  x, offset, mask, _ = dcnv3_random_operands((1, 4, 5), 16, 2, 9, (4, 5))
  want = ops.dcnv3(x, offset, mask, group=2, implementation="xla")
  got = ops.dcnv3(x, offset, mask, group=2, implementation="pallas_mosaic")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  bf16 = ops.dcnv3(*(jnp.asarray(a, jnp.bfloat16) for a in (x, offset, mask)), group=2,
                   implementation="pallas_mosaic")
  assert bf16.dtype == jnp.bfloat16
  assert_rel_close(bf16, want, 2e-2, "bf16")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_kernels_lower_for_tpu(dtype):
  """Export for TPU lowers both kernels to Mosaic without a TPU on this machine."""
  shape = stage_shapes("internimage_t", batch=2)[0]
  s, c, g = shape.size, shape.channels, shape.group
  args = (jax.ShapeDtypeStruct((2, s, s, c), dtype),
          jax.ShapeDtypeStruct((2, s, s, g * 18), dtype),
          jax.ShapeDtypeStruct((2, s, s, g * 9), dtype))
  params = DCNv3Params.create(group=g)
  op = lambda x, o, m: dcnv3_mosaic(x, o, m, params, MosaicConfig(), False)
  loss = lambda x, o, m: jnp.sum(op(x, o, m).astype(jnp.float32))
  for fn, kernel in ((op, "dcnv3_forward_mosaic"),
                     (jax.grad(loss, argnums=(0, 1, 2)), "dcnv3_backward_mosaic")):
    exported = export.export(jax.jit(fn), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    assert "tpu_custom_call" in text and kernel in text


@pytest.mark.parametrize("kwargs", [dict(block_q=12), dict(block_q=0), dict(chunk=0),
                                    dict(block_q=16, chunk=3)])
def test_config_validates(kwargs):
  with pytest.raises(ValueError, match="MosaicConfig"):
    MosaicConfig(**kwargs)


def test_unsupported_options_are_named():
  x, offset, mask, _ = dcnv3_random_operands((1, 4, 4), 16, 1, 9, (4, 4))
  with pytest.raises(ValueError, match="unknown implementation"):
    ops.dcnv3(x, offset, mask, group=1, implementation="mosaic")
  with precision(np.float64):
    x64 = jnp.asarray(x, jnp.float64)
    with pytest.raises(TypeError, match="take float32 or bfloat16, x is float64"):
      ops.dcnv3(x64, offset, mask, group=1, implementation="pallas_mosaic")
