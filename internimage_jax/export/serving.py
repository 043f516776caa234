"""What every export format serves: uint8 RGB images in, float32 logits out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
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


def weight_bytes(model: nnx.Module) -> int:
  """Bytes of ``model``'s arrays (what an export embeds)."""
  return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)) if hasattr(x, "nbytes"))


def write_directory(out: str | os.PathLike, write: Callable[[Path], None],
                    metadata: dict[str, Any]) -> Path:
  """Fills ``out`` with what ``write(folder)`` puts in a fresh folder, plus ``METADATA``.

  The files are written beside ``out`` first and moved in afterwards, the metadata
  last, so a crash or a full disk leaves no half-written file under ``out``'s names
  (an ONNX file refers to its weights file by name, so both are written under their
  final names in the staging folder).
  """
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
  try:
    write(staging)
    (staging / METADATA).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    for path in sorted(staging.iterdir(), key=lambda p: p.name == METADATA):
      os.replace(path, out / path.name)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return out

