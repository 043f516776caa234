"""StableHLO export: a serialized ``jax.export.Exported`` that JAX alone runs.

DCNv3 runs as its model was built: the XLA fallback lowers for every platform; a model
built with ``implementation="pallas_triton"`` exports for cuda alone, with the Triton
kernels inside as custom calls, for a fixed batch (Pallas blocks have static shapes).
The Mosaic kernels do not export for tpu from a host without one: their interpreted CPU
branch has ordered callbacks, which ``platform_dependent`` cannot lower away.

The weights are constants of the program, which one serialized program holds up to
2 GiB: T to XL in float32 (XL 1.35 GB), not H or G. A fixed batch exported on a CPU host
keeps the CPU's chunking of the batch in the fallback on every platform (correct; a
symbolic batch has none).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.export.serving import (
    dcnv3_implementations, require_fallback, serving_function, weight_bytes)

PLATFORMS = ("cpu", "cuda", "tpu")
PROGRAM = "model.stablehlo"
# The one platform each exportable kernel backend's program lowers for.
KERNEL_PLATFORMS = {"pallas_triton": "cuda"}
TRITON_CALL = "__gpu$xla.gpu.triton"
# Lowering a Triton kernel asks for the target GPU; a host without one lowers for this
# card (XLA compiles the kernels' Triton IR for the GPU that loads the program).
EXPORT_GPU = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                         platform="gpu")
# jax.export serializes to a flatbuffer, whose offsets are 32-bit.
MAX_EMBEDDED_BYTES = 2**31 - 2**26


def to_stablehlo(model: nnx.Module, *, image_size: int, batch: int | None = None,
                 platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """``model`` as an ``Exported`` from uint8 NHWC images to float32 logits, for
  ``platforms``; ``batch=None`` is a symbolic batch dimension."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
  kernels = _kernel_backend(model)
  if kernels is not None:
    if tuple(platforms) != (KERNEL_PLATFORMS[kernels],):
      raise ValueError(f"export: the {kernels} kernels lower for "
                       f"{KERNEL_PLATFORMS[kernels]} alone, not for {list(platforms)}")
    if batch is None:
      raise ValueError("export: the Pallas kernels need a fixed batch (--batch N), not "
                       "a symbolic one")
  serve = serving_function(model, image_size)
  size = weight_bytes(model)
  if size >= MAX_EMBEDDED_BYTES:
    hint = ("--dtype bfloat16 halves them" if size // 2 < MAX_EMBEDDED_BYTES
             else "--format onnx keeps them in a file of their own")
    raise ValueError(f"export: the weights ({size / 1e9:.2f} GB) do not fit in one "
                     f"serialized program (2 GiB at most, a flatbuffers limit); {hint}")
  (dim,) = jax.export.symbolic_shape("batch") if batch is None else (batch,)
  spec = jax.ShapeDtypeStruct((dim, image_size, image_size, 3), jnp.uint8)
  export = functools.partial(jax.export.export, jax.jit(serve), platforms=tuple(platforms))
  if kernels == "pallas_triton":
    export = functools.partial(export, disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)])
    if jax.default_backend() != "gpu":
      target = jax.sharding.AbstractMesh((1,), ("export",), abstract_device=EXPORT_GPU)
      with jax.sharding.use_abstract_mesh(target):
        return export()(spec)
  return export()(spec)


def _kernel_backend(model: nnx.Module) -> str | None:
  """The kernel backend (a key of ``KERNEL_PLATFORMS``) ``model``'s DCNv3 layers were
  built with; None for the XLA fallback."""
  chosen = dcnv3_implementations(model)
  if len(chosen) == 1 and next(iter(chosen)) in KERNEL_PLATFORMS:
    return next(iter(chosen))
  require_fallback(model, f"a program for {', '.join(PLATFORMS)} (or a cuda program with "
                          "implementation='pallas_triton')")
  return None


def write(exported: jax.export.Exported, folder: Path) -> None:
  """Writes ``exported`` into ``folder``."""
  (folder / PROGRAM).write_bytes(bytes(exported.serialize()))


def load(path: Path) -> Callable[[jax.Array], jax.Array]:
  """The program at ``path`` as a function of uint8 NHWC images."""
  return jax.export.deserialize(bytearray(path.read_bytes())).call
