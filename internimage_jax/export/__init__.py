"""Serving export: a classifier as a StableHLO program (``jax.export``) or an ONNX model
(``jax2onnx``, DCNv3 as ONNX ``GridSample``).

    python -m internimage_jax.export --model internimage_t --checkpoint in1k --out /tmp/t_serving
    python -m internimage_jax.export --model internimage_t --checkpoint CKPT --out DIR \\
        --format onnx --batch dynamic --image-size 224

Both take uint8 RGB images ``[batch, size, size, 3]`` (resized by the caller, e.g.
``predict.preprocess`` without its normalisation) and return float32 logits ``[batch,
classes]``; ImageNet normalisation and the weights are inside, so :func:`load` runs an
export without this package's model code (JAX for StableHLO, onnxruntime for ONNX).
``--batch dynamic`` exports a symbolic batch dimension. ``DIR`` holds ``model.stablehlo``
(the serialized ``jax.export.Exported``) or ``model.onnx``, and ``export.json`` (what it
was made from).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from internimage_jax.export import onnx, stablehlo
from internimage_jax.export.command import FILES, main, parse_batch
from internimage_jax.export.onnx import to_onnx
from internimage_jax.export.serving import (
    METADATA, read_metadata, serving_function, write_directory)
from internimage_jax.export.stablehlo import to_stablehlo

__all__ = ["FILES", "METADATA", "load", "main", "parse_batch", "save", "serving_function", "to_onnx",
           "to_stablehlo"]


def save(exported: jax.export.Exported, out: str | os.PathLike,
         metadata: dict[str, Any]) -> Path:
  """Writes a StableHLO export and ``metadata`` to the directory ``out``, each file whole
  or not at all."""
  return write_directory(out, lambda folder: stablehlo.write(exported, folder),
                         {**metadata, "format": "stablehlo"}, replaces=FILES)


def load(directory: str | os.PathLike) -> Callable[[Any], Any]:
  """The export in ``directory`` as a function of uint8 NHWC images (StableHLO in JAX,
  ONNX in onnxruntime), as its ``export.json`` names it."""
  readers = {"stablehlo": (stablehlo.PROGRAM, stablehlo.load), "onnx": (onnx.MODEL, onnx.load)}
  fmt = read_metadata(directory).get("format")
  if fmt not in readers:
    raise ValueError(f"{directory}: unknown export format {fmt!r} in {METADATA}")
  name, reader = readers[fmt]
  if not (Path(directory) / name).is_file():
    raise FileNotFoundError(f"{directory} holds no {name} (its {METADATA} says {fmt})")
  return reader(Path(directory) / name)
