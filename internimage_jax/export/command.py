"""``python -m internimage_jax.export``: a classifier checkpoint to a serving export."""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import jax
import jax.numpy as jnp

from internimage_jax.export import onnx, stablehlo
from internimage_jax.export.serving import write_directory

FORMATS = ("stablehlo", "onnx")
# Every file an export may write: a new export into the same folder removes the others.
FILES = (stablehlo.PROGRAM, onnx.MODEL, onnx.MODEL + ".data")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m internimage_jax.export",
      description="A classifier as a serving export: uint8 NHWC images in, float32 logits "
                  "out, normalisation and weights inside.")
  parser.add_argument("--model", required=True, help="internimage_t ... internimage_g")
  parser.add_argument("--checkpoint", required=True,
                      help="a published tag (in1k, in22k, 22kto1k) or a checkpoint path")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--format", default="stablehlo", help=f"one of {FORMATS}")
  parser.add_argument("--dtype", default="float32",
                      help=f"one of {sorted(DTYPES)} (onnx: float32)")
  parser.add_argument("--batch", default="1", help="a positive integer or 'dynamic'")
  parser.add_argument("--image-size", type=int, default=None,
                      help="input size (default: the resolution of the model's checkpoints)")
  parser.add_argument("--platforms", default=None,
                      help=f"stablehlo: comma-separated, among {stablehlo.PLATFORMS} "
                           "(default: all)")
  parser.add_argument("--implementation", default="xla",
                      help="DCNv3: xla (the fallback, every platform) or pallas (stablehlo "
                           "for cuda alone: the Triton kernels inside, a fixed batch)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="default: the checkpoint's classifier")
  parser.add_argument("--options", default="{}",
                      help='constructor options as JSON, e.g. \'{"channels": 16}\'')
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  from internimage_jax import models
  from internimage_jax.pretrained import entry_of

  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    if args.format not in FORMATS:
      raise ValueError(f"--format must be one of {FORMATS}, got {args.format!r}")
    if args.dtype not in DTYPES:
      raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {args.dtype!r}")
    if args.format == "onnx" and args.dtype != "float32":
      raise ValueError("--format onnx exports float32 (runtimes such as TensorRT choose "
                       "their own reduced precision); --dtype bfloat16 is for stablehlo")
    if args.format == "onnx" and args.platforms is not None:
      raise ValueError("--platforms is for --format stablehlo (an ONNX model runs wherever "
                       "its runtime does)")
    if args.implementation not in ("xla", "pallas"):
      raise ValueError(f"--implementation must be xla or pallas, got {args.implementation!r}")
    batch = parse_batch(args.batch)
    options = json.loads(args.options)
    if not isinstance(options, dict):
      raise ValueError("--options must be a JSON object")
    platforms = [p.strip() for p in (args.platforms or ",".join(stablehlo.PLATFORMS)).split(",")
                 if p.strip()]
    if "implementation" in options:
      raise ValueError("--options: choose DCNv3's implementation with --implementation")
    implementation = "xla"
    if args.implementation == "pallas":
      kernels = {p: k for k, p in stablehlo.KERNEL_PLATFORMS.items()}
      if args.format != "stablehlo" or len(platforms) != 1 or platforms[0] not in kernels:
        raise ValueError("--implementation pallas exports stablehlo with the kernels for one "
                         f"platform ({', '.join(kernels)}): --platforms cuda")
      implementation = kernels[platforms[0]]
      from pallas_kernels.dcnv3.api import triton_kernels

      if triton_kernels()[0] is None:
        raise ValueError(f"--implementation pallas: this jax {jax.__version__} has no Pallas "
                         f"Triton backend ({triton_kernels()[1]}); export with --implementation xla")
    entry = entry_of(args.checkpoint, args.model)  # as create() resolves it: a tag wins
    if entry is not None and entry.holds != "classifier":
      raise ValueError(f"--checkpoint {args.checkpoint}: {entry.filename} is a {entry.holds}'s "
                       "checkpoint; the export takes classifiers")
    image_size = args.image_size
    if image_size is None:
      image_size = entry.image_size if entry else models.IMAGE_SIZES.get(args.model, 224)
    dtype = DTYPES[args.dtype]
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      # By default the XLA fallback: one program that lowers for every platform (Pallas
      # kernels lower for one platform only), and the operator the ONNX plugin converts.
      model = models.create(args.model, num_classes=args.num_classes,
                            pretrained=args.checkpoint, dtype=dtype, param_dtype=dtype,
                            **{**options, "implementation": implementation})
    fresh = [str(w.message) for w in caught if "newly initialised" in str(w.message)]
    if fresh:
      raise ValueError(f"{fresh[0]}: an exported classifier must be trained (check "
                       "--checkpoint and --num-classes)")
    metadata = {
        "model": args.model, "checkpoint": str(args.checkpoint), "format": args.format,
        "dtype": args.dtype, "batch": args.batch, "image_size": image_size,
        "num_classes": model.num_classes, "options": options,
        "implementation": implementation,
        "input": "uint8 RGB [batch, size, size, 3]", "output": "float32 logits"}
    if args.format == "stablehlo":
      exported = stablehlo.to_stablehlo(model, image_size=image_size, batch=batch,
                                        platforms=platforms)
      write = lambda folder: stablehlo.write(exported, folder)
      metadata["platforms"] = platforms
      where = ", ".join(platforms)
    else:
      write = lambda folder: onnx.to_onnx(model, folder / onnx.MODEL, image_size=image_size,
                                          batch=batch)
      metadata["opset"] = onnx.OPSET
      where = f"ONNX opset {onnx.OPSET}"
    out = write_directory(args.out, write, metadata, replaces=FILES)
  except (OSError, ValueError, ImportError, TypeError, NotImplementedError) as e:
    print("error: " + "; ".join(line.strip() for line in str(e).splitlines()), file=sys.stderr)
    return 1
  print(f"wrote {out} ({args.model}, {model.num_classes} classes, {image_size} px, batch "
        f"{args.batch}, {args.dtype}, {where})")
  return 0
