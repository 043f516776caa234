"""What every export format serves: uint8 RGB images in, float32 logits out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.training.batch_augment import normalize

METADATA = "export.json"


def serving_function(model: nnx.Module, image_size: int) -> Callable[[jax.Array], jax.Array]:
  """``model`` (put in eval mode) as a function of uint8 ``[batch, size, size, 3]`` images
  returning float32 logits, with ImageNet normalisation inside and the weights as
  constants of whatever traces it."""
  if image_size < 32 or image_size % 32:
    raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
  if getattr(model, "features_only", False):
    raise ValueError("export: a features_only backbone has no logits to serve")
  model.eval()
  # Without its random keys (drop path's, which eval mode never draws from): a typed key
  # array cannot be an ONNX value.
  graphdef, keys, state = nnx.split(model, nnx.RngKey, ...)
  no_keys = jax.tree.map(lambda _: None, keys)

  def serve(images: jax.Array) -> jax.Array:
    # A fresh copy per trace: its variables belong to this trace (the RNG counters of
    # eval-mode drop path may still be touched).
    net = nnx.merge(graphdef, no_keys, state, copy=True)
    return net(normalize(images)).astype(jnp.float32)

  return serve


def dcnv3_implementations(model: nnx.Module) -> set[str]:
  """The ``implementation`` of every DCNv3 layer of ``model``."""
  from internimage_jax.models.dcnv3 import DCNv3

  return {module.implementation for _, module in nnx.iter_graph(model)
          if isinstance(module, DCNv3)}


def require_fallback(model: nnx.Module, what: str) -> None:
  """A one-line error unless ``model``'s DCNv3 layers all run the XLA fallback."""
  chosen = dcnv3_implementations(model) - {"xla"}
  if chosen:
    raise ValueError(f"export: {what} needs DCNv3 built with implementation='xla' (the "
                     f"fallback, which lowers for every platform), got {sorted(chosen)}")


def weight_bytes(model: nnx.Module) -> int:
  """Bytes of ``model``'s arrays (what an export embeds)."""
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "nbytes"))


def write_directory(out: str | os.PathLike, write: Callable[[Path], None],
                    metadata: dict[str, Any], replaces: Sequence[str] = ()) -> Path:
  """Fills ``out`` with what ``write(folder)`` puts in a fresh folder, plus ``METADATA``.

  Each file is written in a staging folder inside ``out`` and moved into place whole:
  data files first, then the model that refers to them, the metadata last. Files named
  in ``replaces`` (an earlier export's) that this export does not write are removed
  first, so ``out`` never mixes two exports' models. A crash or a full disk leaves no
  half-written file under the final names (at worst a ``.staging-*`` folder).
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
  try:
    write(staging)
    (staging / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    written = {path.name for path in staging.iterdir()}
    for stale in set(replaces) - written:
      (out / stale).unlink(missing_ok=True)
    order = lambda path: (path.name == METADATA, not path.name.endswith(".data"))
    for path in sorted(staging.iterdir(), key=order):
      os.replace(path, out / path.name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
  """``directory``'s ``METADATA``, or a one-line error saying it holds no export."""
  path = Path(directory) / METADATA
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no exported model ({METADATA} is missing)")
  return json.loads(path.read_text())
