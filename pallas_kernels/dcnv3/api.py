"""Public entry point of the DCNv3 sampling operator."""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Sequence
from types import ModuleType
from typing import Literal

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import AbstractMesh, AxisType, Mesh

from pallas_kernels.dcnv3.config import INTERPRET_CONFIG, MosaicConfig
from pallas_kernels.dcnv3.mosaic import dcnv3_mosaic
from pallas_kernels.dcnv3.params import DCNv3Params, IntOrPair
from pallas_kernels.dcnv3.reference import dcnv3_xla
from pallas_kernels.dcnv3.sharding import Operator, per_device, placement

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


@functools.cache
def triton_kernels() -> tuple[ModuleType | None, str | None]:
  """The Triton kernel module, or ``(None, why)`` when this jax has no Pallas Triton
  backend (deprecated since jax 0.11, to be removed)."""
  try:
    return importlib.import_module("pallas_kernels.dcnv3.triton"), None
  except ImportError as e:
    return None, f"{type(e).__name__}: {e}"


def _triton_or_raise(implementation: str) -> ModuleType:
  module, why = triton_kernels()
  if module is None:
    raise NotImplementedError(
        f"dcnv3: implementation={implementation!r} needs the Pallas Triton backend, which "
        f"this jax {jax.__version__} does not have ({why}); use implementation='xla' or "
        "'auto' (the fallback), or a jax release in the range the README names")
  return module


_WARNED_NO_TRITON = False


def _warn_no_triton(why: str) -> None:
  global _WARNED_NO_TRITON
  if not _WARNED_NO_TRITON:
    _WARNED_NO_TRITON = True
    warnings.warn(
        f"dcnv3: jax {jax.__version__} has no Pallas Triton backend ({why}); "
        "implementation='auto' runs the XLA fallback on this GPU (slower, same results)",
        RuntimeWarning, stacklevel=5)  # the caller of dcnv3


def _auto(platform: str, dtype: jnp.dtype, *, placed: bool) -> str:
  """What ``implementation="auto"`` runs.

  On a GPU the Triton kernels (benchmarks/RESULTS.md), on one device or on any number
  when the operator knows its placement (``placed``: it then runs per device inside
  ``shard_map``). Without a known placement several devices keep the fallback: a
  kernel is an opaque custom call, and XLA would gather operands that jit's
  ``in_shardings`` split onto every device, where the fallback's gathers partition.
  TPUs keep the fallback until the Mosaic kernels have run on one, float64 (a testing
  dtype) everywhere, and a jax without the Pallas Triton backend (with one warning).
  """
  if platform != "gpu" or dtype == jnp.float64:
    return "xla"
  if not placed and jax.device_count() > 1 and not _inside_shard_map():
    return "xla"
  module, why = triton_kernels()
  if module is None:
    _warn_no_triton(why)
    return "xla"
  return "pallas_triton"


def _inside_shard_map() -> bool:
  """Whether every axis of the context mesh is manual: the code runs per device."""
  mesh = jax.sharding.get_abstract_mesh()
  return (mesh is not None and not mesh.empty
          and all(kind == AxisType.Manual for kind in mesh.axis_types))


def _select(implementation: str, dtype: jnp.dtype, *, placed: bool) -> Operator:
  """The per-device operator ``(x, offset, mask, params) -> out`` of ``implementation``."""
  platform = jax.default_backend()
  if implementation == "auto":
    implementation = _auto(platform, dtype, placed=placed)
  if implementation == "xla":
    return dcnv3_xla
  requested = implementation
  if implementation == "pallas":
    implementation = "pallas_mosaic" if platform == "tpu" else "pallas_triton"
  backend = "triton" if implementation == "pallas_triton" else "mosaic"
  native = {"triton": "gpu", "mosaic": "tpu"}[backend]
  if platform not in (native, "cpu"):
    raise NotImplementedError(
        f"dcnv3: implementation={implementation!r} runs on {native} (or on cpu in "
        f"interpret mode), not on {platform!r}")
  if backend == "triton":
    kernels = _triton_or_raise(requested)
    compiled = lambda x, o, m, params: kernels.dcnv3_triton(x, o, m, params, None, False)
    interpreted = lambda x, o, m, params: kernels.dcnv3_triton(
        x, o, m, params, INTERPRET_CONFIG, True)
    native_platform = "cuda"
  else:
    compiled = lambda x, o, m, params: dcnv3_mosaic(x, o, m, params, MosaicConfig(), False)
    interpreted = lambda x, o, m, params: dcnv3_mosaic(
        x, o, m, params, MosaicConfig(), pltpu.InterpretParams())
    native_platform = "tpu"
  if platform == native:
    return compiled

  def on_cpu(x, o, m, params):
    # Interpreted where it runs here; compiled where the program is lowered for the
    # kernel's own platform (jax.export from this host).
    return jax.lax.platform_dependent(
        x, o, m, cpu=functools.partial(interpreted, params=params),
        **{native_platform: functools.partial(compiled, params=params)})

  return on_cpu


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
    mesh: Mesh | AbstractMesh | None = None,
    batch_axes: str | Sequence[str] | None = None,
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
      both are tested without hardware); ``"auto"``, the Triton kernels on a GPU for
      float32/bfloat16/float16 (on several devices when the placement below is known),
      else the XLA fallback (``_auto``).
    mesh: the mesh the operands are split over; by default the one in their
      sharding type (Explicit axes) or the one set with ``jax.set_mesh``.
    batch_axes: the mesh axes that split the batch; by default those of ``x``'s
      sharding type (Explicit axes), else every Auto axis of the mesh. With a mesh the
      operator runs per device inside ``shard_map`` (``sharding.py``): no operand is
      gathered and no gradient reduced across devices.

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
  if 0 in offset.shape[:3]:  # an empty batch or output: nothing to sample, nothing to launch
    return jnp.zeros((*offset.shape[:3], x.shape[-1]), x.dtype)
  where = placement(x, params, mesh=mesh, batch_axes=batch_axes)
  op = _select(implementation, x.dtype, placed=where is not None)
  if where is None:
    return op(x, offset, mask, params)
  return per_device(op, where, x, offset, mask, params)
