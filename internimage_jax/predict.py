"""Classify images with an InternImage checkpoint and print the top-5 classes, or segment
them with an UperNet checkpoint and write colour overlays and label maps.

    python -m internimage_jax.predict --model internimage_t --checkpoint DIR image.jpg ...
    python -m internimage_jax.predict --task segmentation --model upernet_internimage_t \
        --checkpoint CKPT image.jpg [more.jpg ...] --out overlay.png [--slide]

``--checkpoint`` is an orbax directory from ``internimage_jax.convert`` (or
``convert.save_orbax``; its ``model.json`` gives the options of a non-official size) or
an official ``.pth``/``.safetensors`` file. Classification: the original's evaluation
transform (shorter side resized bicubic to the model's image size, a centre crop of
that size, ImageNet mean/std).

Segmentation follows mmseg's test pipeline (spec ``segmentation.md`` sections 5, 7): a
keep-ratio resize to the model's ``img_scale`` ((2048, 512) for T/S/B, (2560, 640) for
L/XL, (3584, 896) for H; ``--img-scale LONG SHORT`` to change), each side rounded up to
a multiple of 32 (bilinear), ImageNet mean/std; whole-image inference (or ``--slide``:
windows of ``--crop`` every ``--stride`` pixels); the logits resized back to the
original image size before the argmax. Per image it writes

  - the overlay (the ADE20K palette blended over the image, ``--opacity`` 0.5), and
  - the label map, a PNG of class indices (8-bit; 16-bit above 256 classes),

and prints the classes present with their pixel shares, largest first. Output names:
with one image, the overlay is ``--out`` itself and the labels ``<out stem>_labels.png``;
with several, ``<out stem>_<image stem><out suffix>`` and
``<out stem>_<image stem>_labels.png`` (when two images share a stem, every name gets
the image's 1-based position too: ``<out stem>_<n>_<image stem>...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from functools import cache, partial
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

  return _normalise(eval_resize_crop(image, size))


def _normalise(image: Image.Image | np.ndarray) -> np.ndarray:
  array = np.asarray(image, np.float32) / 255.0
  return (array - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def load_model(model_name: str, checkpoint: str | Path, num_classes: int | None = None,
               use_ema: bool = False):
  """Builds ``model_name`` (options from the checkpoint's ``model.json``) and loads it;
  ``checkpoint`` is a path or a published tag (``"in1k"``, ``internimage_jax.pretrained``)."""
  from internimage_jax import convert, models, pretrained

  if use_ema and not pretrained.is_path(checkpoint):
    raise ValueError("--use-ema reads the EMA copy of a .pth file; pass its path")
  entry = pretrained.entry_of(checkpoint, model_name)
  if entry is not None and entry.holds != "classifier":
    raise ValueError(f"{entry.filename} is a {entry.holds}'s checkpoint; pass --task "
                     "segmentation and the upernet_ model")
  checkpoint, entry = pretrained.resolve(checkpoint, model_name)
  metadata = convert.read_model_json(checkpoint) if Path(checkpoint).is_dir() else {}
  if num_classes is None:
    num_classes = metadata.get("num_classes", entry.num_classes if entry else 1000)
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


# --- segmentation -------------------------------------------------------------------------

SIZE_DIVISOR = 32


def seg_img_scale(model_name: str) -> tuple[int, int]:
  """The test ``img_scale`` (long, short) of an official UperNet configuration: (4 crop,
  crop)."""
  from internimage_jax.models.segmentation.segmentor import CROP_SIZES

  crop = CROP_SIZES[model_name]
  return 4 * crop, crop


def seg_preprocess(image: Image.Image, img_scale: Sequence[int],
                   size_divisor: int = SIZE_DIVISOR) -> np.ndarray:
  """mmseg's test transform: ``[h, w, 3]`` float32, normalised, at the test size (keep
  ratio to ``img_scale``, sides rounded up to ``size_divisor``), no padding."""
  from internimage_jax.training.segmentation.transforms import SegTestTransform

  w, h = image.size
  # An unbounded canvas never shrinks the image; the real canvas is then the test size.
  transform = SegTestTransform(tuple(img_scale), size_divisor, canvas=(1 << 30, 1 << 30),
                               label_canvas=(h, w))
  _, test_size, _ = transform.test_size(h, w)
  transform = dataclasses.replace(transform, canvas=test_size)
  return _normalise(transform(image, np.zeros((h, w), np.uint8))["image"])


def load_segmentor(model_name: str, checkpoint: str | Path, num_classes: int | None = None,
                   use_ema: bool = False):
  """Builds the UperNet ``model_name`` and loads it. An orbax directory's ``model.json``
  (``{"model", "num_classes", "options": {"backbone", "decode_head", "auxiliary_head"}}``,
  the keyword arguments of ``create_segmentor``) gives a non-official size; otherwise the
  official configuration with ``num_classes`` (default 150, ADE20K)."""
  from internimage_jax import convert, pretrained
  from internimage_jax.models.segmentation import create_segmentor
  from internimage_jax.models.segmentation.segmentor import segmentor_options

  segmentor_options(model_name)  # a clear error for an unknown name
  entry = pretrained.entry_of(checkpoint, model_name.removeprefix("upernet_"))
  if entry is not None and entry.holds != "segmentor":
    raise ValueError(f"{entry.filename} is a classification checkpoint; the UperNet's "
                     "is 'ade20k'")
  checkpoint, _ = pretrained.resolve(checkpoint, model_name.removeprefix("upernet_"))
  if not Path(checkpoint).exists():  # before building a model of up to a billion parameters
    raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
  metadata = convert.read_model_json(checkpoint) if Path(checkpoint).is_dir() else {}
  if num_classes is None:
    num_classes = metadata.get("num_classes", 150)
  seg = create_segmentor(model_name, num_classes=num_classes, **metadata.get("options", {}))
  convert.load_checkpoint(seg, checkpoint, use_ema=use_ema)
  seg.eval()
  return seg


@partial(nnx.jit, static_argnames=("mode", "crop", "stride"))
def _seg_logits(seg, images: jax.Array, size: jax.Array, mode: str, crop: tuple[int, int],
                stride: tuple[int, int]) -> jax.Array:
  from internimage_jax.models.segmentation.inference import scale_logits

  return scale_logits(seg, images, size, mode=mode, crop=crop, stride=stride)[0]


@partial(jax.jit, static_argnames=("label_canvas",))
def _seg_labels(logits: jax.Array, size: jax.Array, label_size: jax.Array,
                label_canvas: tuple[int, int]) -> jax.Array:
  from internimage_jax.models.segmentation.inference import predict_labels

  return predict_labels([(logits, size)], label_size, label_canvas)


def segment(seg, image: np.ndarray, original_size: Sequence[int],
            slide: tuple[int, int] | None = None) -> np.ndarray:
  """Labels ``[H, W]`` (int32) at the ``original_size`` (H, W) from one test-size image
  ``[h, w, 3]`` (:func:`seg_preprocess`): whole-image inference, or with ``slide =
  (crop, stride)`` sliding windows. The logits program is compiled once per test size,
  the resize to the original once per original size."""
  th, tw = image.shape[:2]
  if slide is None:
    # The canvas is exactly the test size: no padding, as the original.
    mode, crop, stride, canvas = "whole", (th, tw), (th, tw), image
  else:
    mode, crop, stride = "slide", (slide[0],) * 2, (slide[1],) * 2
    # A test size under one window gets zero padding (after normalisation) up to it.
    canvas = np.zeros((max(th, crop[0]), max(tw, crop[1]), 3), np.float32)
    canvas[:th, :tw] = image
  size = jnp.asarray([[th, tw]], jnp.int32)
  logits = _seg_logits(seg, jnp.asarray(canvas[None]), size, mode=mode, crop=crop,
                       stride=stride)
  h, w = (int(v) for v in original_size)
  labels = _seg_labels(logits, size, jnp.asarray([[h, w]], jnp.int32), label_canvas=(h, w))
  return np.asarray(labels[0])


def seg_classes(num_classes: int) -> tuple[list[str], np.ndarray]:
  """Class names and palette (uint8 ``[num_classes, 3]``): ADE20K's for 150 classes,
  otherwise ``class i`` and ADE20K's colours in turn."""
  from internimage_jax.training.segmentation.sources import ade20k_classes

  names, palette = ade20k_classes()
  if num_classes == len(names):
    return [n.strip() for n in names], palette  # mmseg's 'bed ' has a trailing space
  return [f"class {i}" for i in range(num_classes)], palette[np.arange(num_classes) % len(names)]


def overlay(image: Image.Image, labels: np.ndarray, palette: np.ndarray,
            opacity: float = 0.5) -> Image.Image:
  """The label colours blended over the image (``opacity`` of colour), RGB."""
  blend = (np.asarray(image, np.float32) * (1 - opacity)
           + palette[labels].astype(np.float32) * opacity)
  return Image.fromarray(np.clip(blend + 0.5, 0, 255).astype(np.uint8), "RGB")


def label_image(labels: np.ndarray, num_classes: int) -> Image.Image:
  """The label map as a PNG-ready image of class indices (8-bit; 16-bit above 256)."""
  if num_classes <= 256:
    return Image.fromarray(labels.astype(np.uint8), "L")
  return Image.fromarray(labels.astype(np.uint16))


def class_shares(labels: np.ndarray, num_classes: int) -> list[tuple[float, int]]:
  """``(pixel share, class)`` of each class present, largest share first."""
  counts = np.bincount(labels.ravel(), minlength=num_classes)
  present = np.flatnonzero(counts)
  order = sorted(present, key=lambda c: (-counts[c], c))
  return [(counts[c] / labels.size, int(c)) for c in order]


def output_paths(out: str | Path, images: Sequence[str | Path]) -> list[tuple[Path, Path]]:
  """``(overlay, label map)`` paths per image, by the rule of the module docstring."""
  out = Path(out)
  labels = lambda stem: out.with_name(f"{stem}_labels.png")  # noqa: E731
  if len(images) == 1:
    return [(out, labels(out.stem))]
  stems = [Path(p).stem for p in images]
  unique = len(set(stems)) == len(stems)
  names = [f"{out.stem}_{s}" if unique else f"{out.stem}_{i}_{s}"
           for i, s in enumerate(stems, 1)]
  return [(out.with_name(n + out.suffix), labels(n)) for n in names]


def _one_line(e: BaseException) -> str:
  # Mismatch errors list every key on lines of their own; the CLI prints one line.
  text = " ".join(str(e).split())
  return text if len(text) <= 400 else text[:400] + " ..."


def _segment_main(args: argparse.Namespace) -> int:
  if args.image_size is not None:
    print("error: --image-size is for classification; segmentation takes --img-scale",
          file=sys.stderr)
    return 1
  if args.out is None:
    print("error: --task segmentation needs --out (the overlay image to write)",
          file=sys.stderr)
    return 1
  if Path(args.out).suffix.lower() not in Image.registered_extensions():
    print(f"error: --out {args.out}: unknown image format {Path(args.out).suffix!r} "
          "(use .png or .jpg)", file=sys.stderr)
    return 1
  if not args.slide and (args.crop or args.stride):
    print("error: --crop and --stride apply to --slide", file=sys.stderr)
    return 1
  if not 0 <= args.opacity <= 1:
    print(f"error: --opacity must be in [0, 1], got {args.opacity}", file=sys.stderr)
    return 1
  try:
    seg = load_segmentor(args.model, args.checkpoint, args.num_classes, use_ema=args.use_ema)
  except (OSError, ValueError, TypeError, ImportError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  img_scale = tuple(args.img_scale or seg_img_scale(args.model))
  slide = None
  if args.slide:
    crop = args.crop or seg_img_scale(args.model)[1]
    stride = args.stride or crop * 2 // 3  # mmseg's (341, 341) for a 512 crop
    if not 0 < stride <= crop:
      print(f"error: --stride must be in (0, crop = {crop}], got {stride}", file=sys.stderr)
      return 1
    slide = (crop, stride)
  num_classes = seg.decode_head.num_classes
  names, palette = seg_classes(num_classes)

  failed = 0
  for path, (overlay_path, labels_path) in zip(args.images, output_paths(args.out, args.images)):
    try:
      image = load_image(path)
      labels = segment(seg, seg_preprocess(image, img_scale), (image.height, image.width), slide)
      overlay_path.parent.mkdir(parents=True, exist_ok=True)
      overlay(image, labels, palette, args.opacity).save(overlay_path)
      label_image(labels, num_classes).save(labels_path)
    except (OSError, ValueError) as e:
      print(f"error: {_one_line(e)}", file=sys.stderr)
      failed += 1
      continue
    print(f"{path} -> {overlay_path} {labels_path}")
    for share, c in class_shares(labels, num_classes)[:args.top]:
      print(f"  {share:7.2%}  {names[c]} ({c})")
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status."""
  from internimage_jax.models import IMAGE_SIZES, variants
  from internimage_jax.models.segmentation import SEGMENTORS

  parser = argparse.ArgumentParser(prog="python -m internimage_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", choices=("classification", "segmentation"),
                      default="classification")
  parser.add_argument("--model", required=True,
                      help="variant, e.g. internimage_t (or upernet_internimage_t)")
  parser.add_argument("--checkpoint", required=True,
                      help="weights file, orbax directory, train.py workdir, or a published "
                           "tag (in1k, 22kto1k, ade20k, ...)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classes of a weights file (default: model.json, else 1000 / 150)")
  parser.add_argument("--use-ema", action="store_true", help="EMA weights of a .pth file")
  parser.add_argument("--top", type=int, default=None,
                      help="classes to print (default: 5; segmentation: all present)")
  parser.add_argument("--image-size", type=int, default=None,
                      help="classification: evaluation size (default: the variant's)")
  seg_args = parser.add_argument_group("segmentation")
  seg_args.add_argument("--out", default=None,
                   help="overlay image to write (several images: one per image, see above)")
  seg_args.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                   help="test scale (default: the configuration's, e.g. 2048 512)")
  seg_args.add_argument("--slide", action="store_true", help="sliding-window inference")
  seg_args.add_argument("--crop", type=int, default=None,
                   help="--slide window side (default: the training crop, e.g. 512)")
  seg_args.add_argument("--stride", type=int, default=None,
                   help="--slide step (default: 2/3 of the crop, e.g. 341)")
  seg_args.add_argument("--opacity", type=float, default=0.5, help="of the colours in the overlay")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.task == "segmentation":
    return _segment_main(args)

  try:
    if args.model in SEGMENTORS:
      raise ValueError(f"{args.model} is a segmentor; pass --task segmentation")
    variants.variant_options(args.model)
    model = load_model(args.model, args.checkpoint, args.num_classes, use_ema=args.use_ema)
  except (OSError, ValueError, ImportError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  from internimage_jax.pretrained import entry_of

  entry = entry_of(args.checkpoint, args.model)  # a tag's own resolution (H in22k: 384)
  size = args.image_size or (entry.image_size if entry else IMAGE_SIZES[args.model])
  names = imagenet_classes() if model.num_classes == 1000 else None

  failed = 0
  for path in args.images:
    try:
      batch = preprocess(load_image(path), size)[None]
    except (OSError, ValueError) as e:
      print(f"error: {e}", file=sys.stderr)
      failed += 1
      continue
    top_p, top_i = predict(model, batch, args.top or 5)
    print(path)
    for p, i in zip(top_p[0], top_i[0]):
      label = names[i] if names else f"class {i}"
      print(f"  {p:7.2%}  {label} ({i})")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
