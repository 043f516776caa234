"""StableHLO export: a serialized ``jax.export.Exported`` that JAX alone runs.

DCNv3 runs as the XLA fallback on every platform (a Pallas kernel lowers for one platform
only). The weights are constants of the program, which one serialized program holds up
to 2 GiB: T to XL in float32 (XL 1.35 GB), not H or G. A fixed batch exported on a CPU
host keeps the CPU's chunking of the batch in the fallback on every platform (correct;
a symbolic batch has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.export.serving import serving_function, weight_bytes

PLATFORMS = ("cpu", "cuda", "tpu")
PROGRAM = "model.stablehlo"
# jax.export serializes to a flatbuffer, whose offsets are 32-bit.
MAX_EMBEDDED_BYTES = 2**31 - 2**26


def to_stablehlo(model: nnx.Module, *, image_size: int, batch: int | None = None,
                 platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """``model`` as an ``Exported`` from uint8 NHWC images to float32 logits, for
  ``platforms``; ``batch=None`` is a symbolic batch dimension."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
  serve = serving_function(model, image_size)
  size = weight_bytes(model)
  if size >= MAX_EMBEDDED_BYTES:
    raise ValueError(f"export: the weights ({size / 1e9:.2f} GB) do not fit in one "
                     "serialized program (2 GiB at most, a flatbuffers limit); --dtype "
                     "bfloat16 halves them")
  (dim,) = jax.export.symbolic_shape("batch") if batch is None else (batch,)
  spec = jax.ShapeDtypeStruct((dim, image_size, image_size, 3), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(spec)


def write(exported: jax.export.Exported, folder: Path) -> None:
  """Writes ``exported`` into ``folder``."""
  (folder / PROGRAM).write_bytes(bytes(exported.serialize()))


def load(path: Path) -> Callable[[jax.Array], jax.Array]:
  """The program at ``path`` as a function of uint8 NHWC images."""
  return jax.export.deserialize(bytearray(path.read_bytes())).call
