"""Public entry point of the DCNv3 sampling operator."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.dcnv3.config import INTERPRET_CONFIG, MosaicConfig, TritonConfig
from pallas_kernels.dcnv3.mosaic import dcnv3_mosaic
from pallas_kernels.dcnv3.params import DCNv3Params, IntOrPair
from pallas_kernels.dcnv3.reference import dcnv3_xla
from pallas_kernels.dcnv3.triton import dcnv3_triton

Implementation = Literal["auto", "xla", "pallas", "pallas_triton", "pallas_mosaic"]
IMPLEMENTATIONS: tuple[str, ...] = ("auto", "xla", "pallas", "pallas_triton", "pallas_mosaic")


def _check_shapes(x: jax.Array, offset: jax.Array, mask: jax.Array, params: DCNv3Params) -> None:
  for name, array in (("x", x), ("offset", offset), ("mask", mask)):
    if array.ndim != 4:
      raise ValueError(
          f"dcnv3: {name} must be rank 4 (channels-last [N, H, W, C]), got shape {array.shape}")
    if not jnp.issubdtype(array.dtype, jnp.floating):
      raise TypeError(f"dcnv3: {name} must be floating point, got {array.dtype}")
  n, h, w, channels = x.shape
  g, p = params.group, params.num_points
  if channels % g:
    raise ValueError(
        f"dcnv3: channels ({channels}) must be divisible by group ({g})")
  ho, wo = params.output_size(h, w)
  if ho < 1 or wo < 1:
    raise ValueError(
        f"dcnv3: input {h}x{w} is too small for kernel {params.kernel}, dilation "
        f"{params.dilation} and pad {params.pad} (output would be {ho}x{wo})")
  expected = {"offset": (n, ho, wo, g * p * 2), "mask": (n, ho, wo, g * p)}
  for name, array in (("offset", offset), ("mask", mask)):
    if tuple(array.shape) != expected[name]:
      raise ValueError(
          f"dcnv3: {name} must have shape {expected[name]} = (N, Ho, Wo, group*points"
          f"{'*2' if name == 'offset' else ''}) for x {tuple(x.shape)} with group {g} and "
          f"{p} points, got {tuple(array.shape)}")


def _auto(platform: str, dtype: jnp.dtype) -> str:
  """What ``implementation="auto"`` runs.

  The Triton kernels matched the fallback on an H100 at model shapes and beat it
  (benchmarks/RESULTS.md), so a single GPU uses them. Several devices keep the
  fallback: XLA cannot partition a kernel's custom call, so batch-sharded operands
  would be gathered onto every device. TPUs keep it until the Mosaic kernels have
  run on one, and float64 (a testing dtype) keeps it everywhere.
  """
  if platform == "gpu" and jax.device_count() == 1 and dtype != jnp.float64:
    return "pallas_triton"
  return "xla"


def dcnv3(
    x: jax.Array,
    offset: jax.Array,
    mask: jax.Array,
    *,
    kernel_size: IntOrPair = 3,
    stride: IntOrPair = 1,
    pad: IntOrPair = 1,
    dilation: IntOrPair = 1,
    group: int,
    offset_scale: float = 1.0,
    remove_center: bool = False,
    implementation: Implementation = "auto",
) -> jax.Array:
  """DCNv3 deformable sampling (spec section 1), channels-last.

  Args:
    x: ``[N, H, W, group * C]`` features.
    offset: ``[N, Ho, Wo, group * P * 2]``, laid out ``(g, p, (x, y))``.
    mask: ``[N, Ho, Wo, group * P]``, already normalised by the caller.
    kernel_size, stride, pad, dilation: ints or ``(h, w)`` pairs.
    group: number of groups G; each owns ``C = channels // group`` channels.
    offset_scale: scales the learned offsets and the fixed kernel grid.
    remove_center: drop the centre point (odd square kernels only).
    implementation: ``"xla"``, the bilinear-gather fallback (every platform);
      ``"pallas"``, this platform's Pallas kernels: Triton on GPU, Mosaic on TPU, the
      Triton kernels in interpret mode on CPU; ``"pallas_triton"`` /
      ``"pallas_mosaic"``, one backend explicitly (on CPU in interpret mode, the way
      both are tested without hardware); ``"auto"``, the Triton kernels on a single
      GPU for float32/bfloat16/float16, else the XLA fallback (see below).

  Returns:
    ``[N, Ho, Wo, group * C]`` in the dtype of ``x``; accumulation is float32 for
    float32 and narrower inputs, float64 for float64.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"dcnv3: unknown implementation {implementation!r}; choose one of {IMPLEMENTATIONS}")
  params = DCNv3Params.create(
      kernel_size=kernel_size, stride=stride, pad=pad, dilation=dilation, group=group,
      offset_scale=offset_scale, remove_center=remove_center)
  x, offset, mask = jnp.asarray(x), jnp.asarray(offset), jnp.asarray(mask)
  _check_shapes(x, offset, mask, params)
  platform = jax.default_backend()
  if implementation == "auto":
    implementation = _auto(platform, x.dtype)
  if implementation == "xla":
    return dcnv3_xla(x, offset, mask, params)
  if implementation == "pallas":
    implementation = "pallas_mosaic" if platform == "tpu" else "pallas_triton"
  backend = "triton" if implementation == "pallas_triton" else "mosaic"
  native = {"triton": "gpu", "mosaic": "tpu"}[backend]
  if platform not in (native, "cpu"):
    raise NotImplementedError(
        f"dcnv3: implementation={implementation!r} runs on {native} (or on cpu in "
        f"interpret mode), not on {platform!r}")
  if backend == "triton":
    if platform == "gpu":
      return dcnv3_triton(x, offset, mask, params, TritonConfig(), False)
    return dcnv3_triton(x, offset, mask, params, INTERPRET_CONFIG, True)
  interpret = False if platform == "tpu" else pltpu.InterpretParams()
  return dcnv3_mosaic(x, offset, mask, params, MosaicConfig(), interpret)
