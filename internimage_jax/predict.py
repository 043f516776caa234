"""Classify images with an InternImage checkpoint and print the top-5 classes, segment
them with an UperNet checkpoint and write colour overlays and label maps, or detect
objects with a Mask R-CNN checkpoint and draw their masks, boxes and labels.

    python -m internimage_jax.predict --model internimage_t --checkpoint DIR image.jpg ...
    python -m internimage_jax.predict --task segmentation --model upernet_internimage_t \
        --checkpoint CKPT image.jpg [more.jpg ...] --out overlay.png [--slide]
    python -m internimage_jax.predict --task detection --model mask_rcnn_internimage_t \
        --checkpoint CKPT image.jpg [more.jpg ...] --out boxes.png [--score-thr 0.3]

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

Detection follows mmdet's Mask R-CNN test pipeline (spec ``detection.md`` section 12): a
keep-ratio resize to fit (1333, 800) (bilinear as OpenCV; ``--img-scale LONG SHORT`` to
change, small sizes make it usable on CPU), ImageNet mean/std, zeros padded after the
bottom and right to multiples of 32 after normalisation; the network is told the resized,
unpadded size. As mmdet with ``rescale=True`` (``MaskRCNN.detections``), the boxes are
divided by the resize factors before the NMS, and each kept detection's 28x28 mask is
pasted into its box at the original size (not resized from a mask at the test size). ``--checkpoint`` is an mmdet ``.pth`` /
``.safetensors`` (``backbone.*``, ``neck.*``, ``rpn_head.*``, ``roi_head.*``), an orbax
directory or a train.py run (``model.json``: ``create_detector``'s options), or a
published tag that ``internimage_jax.pretrained`` lists for it. Per image it
writes only the overlay (named as the segmentation overlays): each detection with score
above ``--score-thr`` (default 0.3) drawn over the image, its mask blended in its class's
colour (``--opacity``), its box and a ``name score`` label; and prints one line per
detection, best first: class name, score, box ``x1 y1 x2 y2`` in the original image's
pixels and the mask's area in pixels. Class names: COCO's 80 (mmdet's order) for 80
classes, else a train.py run's ``class_names`` or ``class i``.
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
    task, prefix = {"segmentor": ("segmentation", "upernet_"),
                    "detector": ("detection", "mask_rcnn_")}.get(entry.holds, ("?", ""))
    raise ValueError(f"{entry.filename} is a {entry.holds}'s checkpoint; pass --task "
                     f"{task} and the {prefix} model")
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
    kind = "classification" if entry.holds == "classifier" else f"{entry.holds}'s"
    raise ValueError(f"{entry.filename} is a {kind} checkpoint; the UperNet's is 'ade20k'")
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


# --- detection ----------------------------------------------------------------------------

DET_IMG_SCALE = (1333, 800)
PASTE_CHUNK = 8  # masks pasted per call at the original size (one program per image size)
DETECTOR_OPTIONS = ("backbone", "neck", "rpn_head", "roi_head", "test_cfg", "train_cfg")


@cache
def coco_classes() -> tuple[str, ...]:
  """COCO's 80 detection class names in mmdet's label order (person ... toothbrush)."""
  text = resources.files("internimage_jax").joinpath("data/coco_classes.txt").read_text()
  names = tuple(line.strip() for line in text.splitlines() if line.strip())
  assert len(names) == 80, len(names)
  return names


def det_preprocess(image: Image.Image, img_scale: Sequence[int] = DET_IMG_SCALE,
                   size_divisor: int = SIZE_DIVISOR
                   ) -> tuple[np.ndarray, tuple[int, int], tuple[float, float]]:
  """mmdet's test transform: a keep-ratio resize to fit ``img_scale`` (bilinear, as
  OpenCV), ImageNet mean/std, then zeros after the bottom and right up to multiples of
  ``size_divisor``. Returns the padded ``[H, W, 3]`` float32 image, the resized unpadded
  ``(h, w)`` and the resize factors ``(w_scale, h_scale)`` (new / original size)."""
  from internimage_jax.training.segmentation.transforms import rescale_size, resize_bilinear

  w, h = image.size
  new_w, new_h = rescale_size(w, h, tuple(img_scale))
  resized = _normalise(resize_bilinear(np.asarray(image), (new_h, new_w)))
  ph, pw = (-(-n // size_divisor) * size_divisor for n in (new_h, new_w))
  padded = np.zeros((ph, pw, 3), np.float32)
  padded[:new_h, :new_w] = resized
  return padded, (new_h, new_w), (new_w / w, new_h / h)


def load_detector(model_name: str, checkpoint: str | Path, num_classes: int | None = None,
                  use_ema: bool = False):
  """Builds the Mask R-CNN ``model_name`` and loads it (mmdet's layout; ``checkpoint``
  a path, or a published tag where ``internimage_jax.pretrained`` has one). An orbax
  directory's or a train.py run's ``model.json`` (``{"model", "num_classes", "options":
  {"backbone", "neck", "rpn_head", "roi_head", "test_cfg", "train_cfg"}}``, the arguments of
  ``create_detector``) gives a non-official configuration; otherwise the official one
  with ``num_classes`` (default 80, COCO)."""
  from internimage_jax import convert, pretrained
  from internimage_jax.models.detection import DETECTORS, create_detector

  if model_name not in DETECTORS:
    raise ValueError(f"unknown detector {model_name!r}; choose one of {sorted(DETECTORS)}")
  backbone = model_name.removeprefix("mask_rcnn_")
  if use_ema and not pretrained.is_path(checkpoint):
    raise ValueError("--use-ema reads the EMA copy of a .pth file; pass its path")
  entry = pretrained.entry_of(checkpoint, backbone)
  if entry is not None and entry.holds != "detector":
    kind = "classification" if entry.holds == "classifier" else f"{entry.holds}'s"
    tags = pretrained.tags_holding(backbone, "detector")
    raise ValueError(f"{entry.filename} is a {kind} checkpoint; the Mask R-CNN's: "
                     f"{tags or 'none published'}")
  checkpoint, _ = pretrained.resolve(checkpoint, backbone)
  if not Path(checkpoint).exists():  # before building a model of tens of millions
    raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
  metadata = convert.read_model_json(checkpoint) if Path(checkpoint).is_dir() else {}
  task = metadata.get("task", "detection")
  if task != "detection":
    raise ValueError(f"{checkpoint} holds a {task} model ({metadata.get('model')}); pass "
                     f"--task {task}")
  options = metadata.get("options", {})
  if set(options) - set(DETECTOR_OPTIONS):
    raise ValueError(f"{checkpoint}: model.json's options {sorted(options)} are not a "
                     f"detector's ({', '.join(DETECTOR_OPTIONS)}); model "
                     f"{metadata.get('model')!r}")
  if num_classes is None:
    num_classes = metadata.get("num_classes", 80)
  # A weights file is read (and a bad one refused) before the model is built.
  state = None if Path(checkpoint).is_dir() else convert.read_state_dict(checkpoint, use_ema)
  det = create_detector(model_name, num_classes=num_classes, **options)
  if state is None:
    convert.load_checkpoint(det, checkpoint, use_ema=use_ema)
  else:
    convert.load_state_dict(det, state)
  det.eval()
  return det


def det_classes(num_classes: int, checkpoint: str | Path | None = None) -> list[str]:
  """Class names: a train.py run's ``class_names`` (its ``model.json``) when it has one
  per class, COCO's for 80 classes, otherwise ``class i``."""
  from internimage_jax import convert

  if checkpoint is not None and Path(checkpoint).is_dir():
    names = convert.read_model_json(checkpoint).get("class_names")
    if isinstance(names, list) and len(names) == num_classes:
      return [str(n) for n in names]
  if num_classes == 80:
    return list(coco_classes())
  return [f"class {i}" for i in range(num_classes)]


def det_palette(num_classes: int) -> np.ndarray:
  """A colour per class (uint8 ``[num_classes, 3]``), the same in every run: hues a
  golden-ratio turn apart, so that neighbouring labels differ."""
  import colorsys

  hues = (np.arange(num_classes) * 0.6180339887498949) % 1.0
  rgb = [colorsys.hsv_to_rgb(hue, 0.75, 0.95) for hue in hues]
  return np.rint(np.asarray(rgb, np.float64).reshape(-1, 3) * 255).astype(np.uint8)


@nnx.jit
def _detections(det, images: jax.Array, image_shapes: jax.Array,
                original_shapes: jax.Array) -> dict[str, jax.Array]:
  return det.detections(images, image_shapes, original_shapes=original_shapes)


@partial(jax.jit, static_argnames=("height", "width"))
def _paste(probs: jax.Array, boxes: jax.Array, threshold: jax.Array, height: int,
           width: int) -> jax.Array:
  from internimage_jax.models.detection import paste_masks

  return paste_masks(probs, boxes, height, width) >= threshold


def detect_objects(det, image: Image.Image, img_scale: Sequence[int] = DET_IMG_SCALE,
                   score_thr: float = 0.3) -> dict[str, np.ndarray]:
  """The detections of one image with score above ``score_thr``, best first, in the
  original image's pixels: ``boxes [n, 4]`` (x1, y1, x2, y2, float32), ``scores [n]``,
  ``labels [n]`` (int32) and ``masks [n, H, W]`` (bool, the image's size).

  mmdet's test with ``rescale=True``: the network sees :func:`det_preprocess`'s image
  (boxes clipped to the resized size), the boxes are divided by the resize factors, and
  each 28x28 mask is pasted into its rescaled box at the original size (bilinear, then
  the test configuration's ``mask_thr_binary``)."""
  padded, (h, w), _ = det_preprocess(image, img_scale)
  width, height = image.size
  out = _detections(det, jnp.asarray(padded[None]), jnp.asarray([[h, w]], jnp.float32),
                    jnp.asarray([[height, width]], jnp.float32))
  num = int(out["num"][0])
  scores = np.asarray(out["scores"][0, :num], np.float32)
  keep = np.flatnonzero(scores > score_thr)  # mmdet's visualiser: strictly above
  boxes = np.asarray(out["boxes"][0, :num], np.float32)[keep]
  probs = np.asarray(out["mask_probs"][0, :num], np.float32)[keep]
  masks = np.zeros((len(keep), height, width), bool)
  threshold = jnp.float32(det.test_cfg["rcnn"]["mask_thr_binary"])
  for start in range(0, len(keep), PASTE_CHUNK):
    n = min(PASTE_CHUNK, len(keep) - start)
    chunk_probs = np.zeros((PASTE_CHUNK, *probs.shape[1:]), np.float32)
    chunk_boxes = np.tile(np.asarray([0, 0, 1, 1], np.float32), (PASTE_CHUNK, 1))
    chunk_probs[:n], chunk_boxes[:n] = probs[start:start + n], boxes[start:start + n]
    pasted = _paste(chunk_probs, chunk_boxes, threshold, height=height, width=width)
    masks[start:start + n] = np.asarray(pasted[:n])
  # The division can overshoot the image by float32 rounding only.
  bounds = np.asarray([width, height, width, height], np.float32)
  return {"boxes": np.clip(boxes, 0, bounds), "scores": scores[keep],
          "labels": np.asarray(out["labels"][0, :num], np.int32)[keep], "masks": masks}


def draw_detections(image: Image.Image, dets: dict[str, np.ndarray], names: Sequence[str],
                    palette: np.ndarray, opacity: float = 0.5) -> Image.Image:
  """The detections over the image (RGB): each mask blended in its class's colour
  (``opacity`` of colour), its box and a ``name score`` label; the best drawn last."""
  from PIL import ImageDraw

  order = np.argsort(dets["scores"], kind="stable")  # ascending: the best ends on top
  array = np.asarray(image, np.float32).copy()
  for i in order:
    mask = dets["masks"][i]
    array[mask] = array[mask] * (1 - opacity) + palette[dets["labels"][i]] * opacity
  out = Image.fromarray(np.clip(array + 0.5, 0, 255).astype(np.uint8), "RGB")
  draw = ImageDraw.Draw(out)
  line = max(1, round(max(out.size) / 400))
  for i in order:
    colour = tuple(int(c) for c in palette[dets["labels"][i]])
    x1, y1, x2, y2 = (float(v) for v in dets["boxes"][i])
    draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
    text = f"{names[dets['labels'][i]]} {dets['scores'][i]:.2f}"
    left, top, right, bottom = draw.textbbox((0, 0), text)
    tw, th = right - left + 2, bottom - top + 2
    ty = y1 - th if y1 >= th else y1  # above the box, or inside it at the top edge
    draw.rectangle((x1, ty, x1 + tw, ty + th), fill=colour)
    dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] < 140
    draw.text((x1 + 1 - left, ty + 1 - top), text, fill=(255,) * 3 if dark else (0,) * 3)
  return out


def _detect_main(args: argparse.Namespace) -> int:
  if args.image_size is not None:
    print("error: --image-size is for classification; detection takes --img-scale",
          file=sys.stderr)
    return 1
  if args.out is None:
    print("error: --task detection needs --out (the image to draw the detections on)",
          file=sys.stderr)
    return 1
  if Path(args.out).suffix.lower() not in Image.registered_extensions():
    print(f"error: --out {args.out}: unknown image format {Path(args.out).suffix!r} "
          "(use .png or .jpg)", file=sys.stderr)
    return 1
  if args.slide or args.crop or args.stride:
    print("error: --slide, --crop and --stride are for segmentation", file=sys.stderr)
    return 1
  if not 0 <= args.score_thr <= 1:
    print(f"error: --score-thr must be in [0, 1], got {args.score_thr}", file=sys.stderr)
    return 1
  if not 0 <= args.opacity <= 1:
    print(f"error: --opacity must be in [0, 1], got {args.opacity}", file=sys.stderr)
    return 1
  img_scale = tuple(args.img_scale or DET_IMG_SCALE)
  if min(img_scale) < 1:
    print(f"error: --img-scale must be positive, got {' '.join(map(str, img_scale))}",
          file=sys.stderr)
    return 1
  try:
    det = load_detector(args.model, args.checkpoint, args.num_classes, use_ema=args.use_ema)
    names = det_classes(det.roi_head.bbox_head.num_classes, args.checkpoint)
  except (OSError, ValueError, TypeError, ImportError) as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  palette = det_palette(len(names))

  failed = 0
  for path, (overlay_path, _) in zip(args.images, output_paths(args.out, args.images)):
    try:
      image = load_image(path)
      dets = detect_objects(det, image, img_scale, args.score_thr)
      overlay_path.parent.mkdir(parents=True, exist_ok=True)
      draw_detections(image, dets, names, palette, args.opacity).save(overlay_path)
    except (OSError, ValueError) as e:
      print(f"error: {_one_line(e)}", file=sys.stderr)
      failed += 1
      continue
    n = len(dets["scores"])
    print(f"{path} -> {overlay_path}: {n} detection{'s' * (n != 1)} with score > "
          f"{args.score_thr:g}")
    for box, score, label, mask in list(zip(dets["boxes"], dets["scores"], dets["labels"],
                                            dets["masks"]))[:args.top]:
      x1, y1, x2, y2 = (float(v) for v in box)
      print(f"  {names[label]}  {score:.3f}  {x1:.1f} {y1:.1f} {x2:.1f} {y2:.1f}  "
            f"{int(mask.sum())} px")
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  """The command line (module docstring); returns the exit status."""
  from internimage_jax.models import IMAGE_SIZES, variants
  from internimage_jax.models.detection import DETECTORS
  from internimage_jax.models.segmentation import SEGMENTORS

  parser = argparse.ArgumentParser(prog="python -m internimage_jax.predict",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--task", choices=("classification", "segmentation", "detection"),
                      default="classification")
  parser.add_argument("--model", required=True,
                      help="variant, e.g. internimage_t (or upernet_internimage_t, "
                           "mask_rcnn_internimage_t)")
  parser.add_argument("--checkpoint", required=True,
                      help="weights file, orbax directory, train.py workdir, or a published "
                           "tag (in1k, 22kto1k, ade20k, ...)")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classes of a weights file (default: model.json, else 1000 / "
                           "150 / 80)")
  parser.add_argument("--use-ema", action="store_true", help="EMA weights of a .pth file")
  parser.add_argument("--top", type=int, default=None,
                      help="classes to print (default: 5; segmentation: all present), "
                           "detections to print (default: all above --score-thr)")
  parser.add_argument("--image-size", type=int, default=None,
                      help="classification: evaluation size (default: the variant's)")
  seg_args = parser.add_argument_group("segmentation and detection")
  seg_args.add_argument("--out", default=None,
                   help="overlay image to write (several images: one per image, see above)")
  seg_args.add_argument("--img-scale", type=int, nargs=2, metavar=("LONG", "SHORT"), default=None,
                   help="test scale (default: the configuration's, e.g. 2048 512; "
                        "detection: 1333 800)")
  seg_args.add_argument("--slide", action="store_true", help="sliding-window inference")
  seg_args.add_argument("--crop", type=int, default=None,
                   help="--slide window side (default: the training crop, e.g. 512)")
  seg_args.add_argument("--stride", type=int, default=None,
                   help="--slide step (default: 2/3 of the crop, e.g. 341)")
  seg_args.add_argument("--opacity", type=float, default=0.5, help="of the colours in the overlay")
  seg_args.add_argument("--score-thr", type=float, default=0.3,
                        help="detection: draw and print the detections scoring above this")
  parser.add_argument("images", nargs="+")
  args = parser.parse_args(sys.argv[1:] if argv is None else argv)
  if args.task == "segmentation":
    return _segment_main(args)
  if args.task == "detection":
    return _detect_main(args)

  try:
    if args.model in SEGMENTORS:
      raise ValueError(f"{args.model} is a segmentor; pass --task segmentation")
    if args.model in DETECTORS:
      raise ValueError(f"{args.model} is a detector; pass --task detection")
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
