"""Serving export: a classifier as a serialized StableHLO program (``jax.export``).

    python -m internimage_jax.export --model internimage_t --checkpoint in1k --out /tmp/t_serving
    python -m internimage_jax.export --model internimage_t --checkpoint CKPT --out DIR \\
        --batch dynamic --dtype bfloat16 --image-size 224 --platforms cpu,cuda,tpu

The program takes uint8 RGB images ``[batch, size, size, 3]`` (resized by the caller,
e.g. ``predict.preprocess`` without its normalisation) and returns float32 logits
``[batch, classes]``; ImageNet normalisation and the weights are inside it, so
:func:`load` runs it with JAX alone, without this package's model code. ``--batch
dynamic`` exports a symbolic batch dimension. ``DIR`` holds ``model.stablehlo`` (the
serialized ``jax.export.Exported``) and ``export.json`` (what it was made from).

DCNv3 runs as the XLA fallback on every platform (a Pallas kernel lowers for one platform
only). The weights are constants of the program, which one serialized program holds up
to 2 GiB: T to XL in float32 (XL 1.35 GB), not H or G. A fixed batch exported on a CPU
host keeps the CPU's chunking of the batch in the fallback on every platform (correct;
``--batch dynamic`` has none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.training.batch_augment import normalize

FORMATS = ("stablehlo",)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PLATFORMS = ("cpu", "cuda", "tpu")
PROGRAM, METADATA = "model.stablehlo", "export.json"
# The program carries its weights as constants; jax.export serializes to a flatbuffer.
MAX_EMBEDDED_BYTES = 2**31 - 2**26


def parse_batch(batch: str | int) -> int | None:
  """``"dynamic"`` -> None (a symbolic dimension), else a positive integer."""
  if batch == "dynamic":
    return None
  try:
    value = int(batch)
  except (TypeError, ValueError):
    value = 0
  if isinstance(batch, bool) or value < 1 or str(value) != str(batch).strip():
    raise ValueError(f"batch must be a positive integer or 'dynamic', got {batch!r}")
  return value


def export_classifier(model: nnx.Module, *, image_size: int, batch: int | None = None,
                      platforms: Sequence[str] = ("cpu",)) -> jax.export.Exported:
  """``model`` (in eval mode) as an ``Exported`` from uint8 NHWC images to float32 logits,
  for ``platforms``; ``batch=None`` is a symbolic batch dimension."""
  unknown = sorted(set(platforms) - set(PLATFORMS))
  if unknown or not platforms:
    raise ValueError(f"platforms must be among {PLATFORMS}, got {list(platforms)}")
  if image_size < 32 or image_size % 32:
    raise ValueError(f"image_size must be a positive multiple of 32, got {image_size}")
  if getattr(model, "features_only", False):
    raise ValueError("export: a features_only backbone has no logits to serve")
  model.eval()
  graphdef, state = nnx.split(model)
  size = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
  if size >= MAX_EMBEDDED_BYTES:
    raise ValueError(f"export: the weights ({size / 1e9:.2f} GB) do not fit in one "
                     "serialized program (2 GiB at most, a flatbuffers limit); --dtype "
                     "bfloat16 halves them")

  def serve(images: jax.Array) -> jax.Array:
    # The weights become the program's constants; the copy's variables belong to this
    # trace (the RNG counters of eval-mode drop path may still be touched).
    net = nnx.merge(graphdef, state, copy=True)
    return net(normalize(images)).astype(jnp.float32)

  (dim,) = jax.export.symbolic_shape("batch") if batch is None else (batch,)
  spec = jax.ShapeDtypeStruct((dim, image_size, image_size, 3), jnp.uint8)
  return jax.export.export(jax.jit(serve), platforms=tuple(platforms))(spec)


def save(exported: jax.export.Exported, out: str | os.PathLike,
         metadata: dict[str, Any]) -> Path:
  """Writes ``exported`` and ``metadata`` to the directory ``out``, each file whole or not
  at all."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  for name, data in ((PROGRAM, bytes(exported.serialize())),
                     (METADATA, json.dumps(metadata, indent=1, sort_keys=True).encode())):
    tmp = out / f"{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, out / name)
  return out


def load(directory: str | os.PathLike) -> Callable[[jax.Array], jax.Array]:
  """The exported program of ``directory`` as a function of uint8 NHWC images."""
  path = Path(directory) / PROGRAM
  if not path.is_file():
    raise FileNotFoundError(f"{directory} holds no exported model ({PROGRAM} is missing)")
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  return exported.call


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m internimage_jax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="internimage_t ... internimage_g")
  parser.add_argument("--checkpoint", required=True,
                      help="a published tag (in1k, in22k, 22kto1k) or a checkpoint path")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--format", default="stablehlo", help=f"one of {FORMATS}")
  parser.add_argument("--dtype", default="float32", help=f"one of {sorted(DTYPES)}")
  parser.add_argument("--batch", default="1", help="a positive integer or 'dynamic'")
  parser.add_argument("--image-size", type=int, default=None,
                      help="input size (default: the resolution of the model's checkpoints)")
  parser.add_argument("--platforms", default="cpu,cuda,tpu",
                      help=f"comma-separated, among {PLATFORMS}")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="default: the checkpoint's classifier")
  parser.add_argument("--options", default="{}",
                      help='constructor options as JSON, e.g. \'{"channels": 16}\'')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  from internimage_jax import models

  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.format not in FORMATS:
      raise ValueError(f"--format must be one of {FORMATS}, got {args.format!r}")
    if args.dtype not in DTYPES:
      raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    batch = parse_batch(args.batch)
    options = json.loads(args.options)
    if not isinstance(options, dict):
      raise ValueError("--options must be a JSON object")
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    if options.get("features_only"):
      raise ValueError("--options: a features_only backbone has no logits to serve")
    from internimage_jax.pretrained import entry_of

    entry = entry_of(args.checkpoint, args.model)  # as create() resolves it: a tag wins
    image_size = args.image_size
    if image_size is None:
      image_size = entry.image_size if entry else models.IMAGE_SIZES.get(args.model, 224)
    dtype = DTYPES[args.dtype]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      # The XLA fallback: one program that lowers for every platform (Pallas kernels
      # lower for one platform only).
      model = models.create(args.model, num_classes=args.num_classes,
                            pretrained=args.checkpoint, dtype=dtype, param_dtype=dtype,
                            **{"implementation": "xla", **options})
    fresh = [str(w.message) for w in caught if "newly initialised" in str(w.message)]
    if fresh:
      raise ValueError(f"{fresh[0]}: an exported classifier must be trained (check "
                       "--checkpoint and --num-classes)")
    exported = export_classifier(model, image_size=image_size, batch=batch,
                                 platforms=platforms)
    out = save(exported, args.out, {
        "model": args.model, "checkpoint": str(args.checkpoint), "format": args.format,
        "dtype": args.dtype, "batch": args.batch, "image_size": image_size,
        "platforms": platforms, "num_classes": model.num_classes, "options": options,
        "input": "uint8 RGB [batch, size, size, 3]", "output": "float32 logits"})
  except (OSError, ValueError, ImportError, TypeError) as e:
    print("error: " + "; ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 1
  print(f"wrote {out} ({args.model}, {model.num_classes} classes, {image_size} px, batch "
        f"{args.batch}, {args.dtype}, {', '.join(platforms)})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
