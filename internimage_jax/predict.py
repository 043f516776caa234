"""Classify images with an InternImage checkpoint and print the top-5 classes.

    python -m internimage_jax.predict --model internimage_t --checkpoint DIR image.jpg ...

``--checkpoint`` is an orbax directory from ``internimage_jax.convert`` or an official
``.pth``/``.safetensors`` file. Images get the original's evaluation transform: the
shorter side resized (bicubic) to the model's image size, a centre crop of that
size, ImageNet mean/std.
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, UnidentifiedImageError

from internimage_jax.training.augment import IMAGENET_MEAN, IMAGENET_STD


@cache
def imagenet_classes() -> tuple[str, ...]:
  """The 1000 ImageNet-1K class names in label order (first WordNet lemma of each)."""
  text = resources.files("internimage_jax").joinpath("data/imagenet1k_classes.txt").read_text()
  names = tuple(line.split("\t", 1)[1].split(",")[0].strip() for line in text.splitlines() if line)
  assert len(names) == 1000, len(names)
  return names


def load_image(path: str | Path) -> Image.Image:
  """Opens an image as 8-bit RGB (deeper images scaled), with an error that names the
  file when it cannot: missing, not an image, damaged, or larger than Pillow's
  decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``, twice over)."""
  from internimage_jax.training.augment import read_rgb

  try:
    return read_rgb(path)
  except FileNotFoundError:
    raise FileNotFoundError(f"image not found: {path}") from None
  except Image.DecompressionBombError as e:
    raise ValueError(f"image {path} is too large to read safely: {e}") from None
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"cannot read image {path}: {e}") from None


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """The evaluation transform: ``[size, size, 3]`` float32, normalised."""
  from internimage_jax.training.augment import eval_resize_crop

  array = np.asarray(eval_resize_crop(image, size), np.float32) / 255.0
  return (array - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def load_model(model_name: str, checkpoint: str | Path, num_classes: int | None = None,
               use_ema: bool = False):
  """Builds ``model_name`` (options from the checkpoint's ``model.json``) and loads it."""
  from internimage_jax import convert, models

  metadata = convert.read_model_json(checkpoint) if Path(checkpoint).is_dir() else {}
  if num_classes is None:
    num_classes = metadata.get("num_classes", 1000)
  model = models.create(model_name, num_classes=num_classes, **metadata.get("options", {}))
  convert.load_checkpoint(model, checkpoint, use_ema=use_ema)
  model.eval()
  return model


@nnx.jit
def _logits(model, images: jax.Array) -> jax.Array:
  return model(images)


def predict(model, images: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Top-``k`` ``(probabilities, class indices)`` for a batch of NHWC images."""
  logits = _logits(model, jnp.asarray(images))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  top_p, top_i = jax.lax.top_k(probs, min(k, probs.shape[-1]))
  return np.asarray(top_p), np.asarray(top_i)


def main(argv: list[str] | None = None) -> int:
  from internimage_jax.models import IMAGE_SIZES, variants

  parser = argparse.ArgumentParser(prog="python -m internimage_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="variant, e.g. internimage_t")
  parser.add_argument("--checkpoint", required=True, help="orbax directory or weights file")
  parser.add_argument("--image-size", type=int, default=None,
                      help="evaluation size (default: the variant's published size)")
  parser.add_argument("--use-ema", action="store_true", help="EMA weights of a .pth file")
  parser.add_argument("--top", type=int, default=5)
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)

  try:
    variants.variant_options(args.model)
    model = load_model(args.model, args.checkpoint, use_ema=args.use_ema)
  except (OSError, ValueError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  size = args.image_size or IMAGE_SIZES[args.model]
  names = imagenet_classes() if model.num_classes == 1000 else None

  failed = 0
  for path in args.images:
    try:
      batch = preprocess(load_image(path), size)[None]
    except (OSError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
      continue
    top_p, top_i = predict(model, batch, args.top)
    print(path)
    for p, i in zip(top_p[0], top_i[0]):
      label = names[i] if names else f"class {i}"
      print(f"  {p:7.2%}  {label} ({i})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
