"""Random-access semantic-segmentation sources: ADE20K's folder layout, tfds scene_parse150,
and an offline data set of digits pasted on textured canvases.

Like the classification sources (``training/sources.py``) a source has ``len()``,
``num_classes``, ``class_names``, ``mean``/``std`` (RGB, 0..1 scale as ``batch_augment.normalize``
takes them) and ``__getitem__(i) -> Record`` with ``image`` a PIL RGB image and ``label`` a
uint8 ``[H, W]`` map of class indices (255 = ignore). An unreadable or inconsistent pair
comes back as ``Record(image=None, label=None, ...)`` so the pipeline can skip and count it.
"""

from __future__ import annotations

import functools
import io
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from internimage_jax.training.augment import IMAGENET_MEAN, IMAGENET_STD
from internimage_jax.training.segmentation.transforms import IGNORE, resize_float
from internimage_jax.training.sources import (IMAGE_EXTENSIONS, DataError, Record, decode_image,
                                             open_tfds)

log = logging.getLogger(__name__)


@functools.cache
def ade20k_classes() -> tuple[list[str], np.ndarray]:
  """ADE20K's 150 class names and mmseg's palette (uint8 ``[150, 3]`` RGB), from
  ``internimage_jax/data/ade20k_classes.tsv`` (copied from mmseg's ``datasets/ade.py``;
  names verbatim, including mmseg's ``'bed '``)."""
  text = resources.files("internimage_jax").joinpath("data/ade20k_classes.tsv").read_text("utf-8")
  names, colours = [], []
  for line in text.splitlines():
    if line:
      name, rgb = line.split("\t")
      names.append(name)
      colours.append([int(c) for c in rgb.split(",")])
  palette = np.asarray(colours, np.uint8)
  palette.flags.writeable = False  # cached: shared by every caller
  return names, palette


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """mmseg's ``reduce_zero_label``: 0 ("other") -> 255, v -> v - 1, 255 stays 255."""
  label = np.asarray(label, np.uint8)
  return np.where(label == 0, IGNORE, np.where(label == IGNORE, IGNORE, label - 1)).astype(np.uint8)


def _ade_names(reduce: bool) -> list[str]:
  names = list(ade20k_classes()[0])
  return names if reduce else ["other"] + names


def decode_label(data: bytes | str | os.PathLike, name: str) -> np.ndarray | None:
  """A label PNG -> uint8 ``[H, W]``; a 3-channel file gives its first channel (R: the
  class in ADE's and tfds's encodings). ``None`` (with a warning) when unreadable."""
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      array = np.asarray(im)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    log.warning("skipping unreadable label %s: %s", name, e)
    return None
  if array.ndim == 3:
    array = array[..., 0]
  if array.ndim != 2 or array.size == 0 or array.max(initial=0) > 255:
    log.warning("skipping label %s: not an 8-bit class map (shape %s)", name, array.shape)
    return None
  return array.astype(np.uint8)


def _pair(image: Image.Image | None, label: np.ndarray | None, name: str,
          reduce: bool) -> Record:
  """The record of a decoded pair, or ``Record(None, None)`` when either half is missing or
  their sizes differ."""
  if image is None or label is None:
    return Record(None, None, name)
  if label.shape != (image.height, image.width):
    log.warning("skipping %s: label %dx%d differs from image %dx%d (h x w)", name,
                *label.shape, image.height, image.width)
    return Record(None, None, name)
  return Record(image, reduce_zero_label(label) if reduce else label, name)


class ADE20KFolderSource:
  """ADE20K as released (ADEChallengeData2016): ``root/images/<split>/*.jpg`` and
  ``root/annotations/<split>/*.png``, matched by file stem, in sorted order. An image
  without annotation stays in the index and reads as ``Record(None, None)``."""

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, root: str | os.PathLike, split: str, reduce_zero_label: bool = True):
    root = Path(root).expanduser()
    if not root.is_dir():
      raise DataError(f"ADE20K folder {root} does not exist (config.data.dir)")
    images, annotations = root / "images" / split, root / "annotations" / split
    for d in (images, annotations):
      if not d.is_dir():
        raise DataError(f"ADE20K folder {root} has no {d.relative_to(root)}/ folder; expected "
                        f"{root}/images/{split}/*.jpg and {root}/annotations/{split}/*.png")
    self.files = sorted(e.path for e in os.scandir(images)
                        if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if not self.files:
      raise DataError(f"{images} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    labels = {Path(e.name).stem: e.path for e in os.scandir(annotations)
              if e.is_file() and e.name.lower().endswith(".png")}
    self.labels: list[str | None] = [labels.get(Path(f).stem) for f in self.files]
    missing = sum(label is None for label in self.labels)
    if missing:
      log.warning("%d of %d images in %s have no annotation in %s; they will be skipped",
                  missing, len(self.files), images, annotations)
    self.reduce_zero_label = reduce_zero_label
    self.class_names = _ade_names(reduce_zero_label)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> Record:
    path, label_path = self.files[index], self.labels[index]
    if label_path is None:
      log.warning("skipping %s: no annotation", path)
      return Record(None, None, path)
    return _pair(decode_image(path, path), decode_label(label_path, label_path), path,
                 self.reduce_zero_label)


class TfdsSegSource:
  """A tfds segmentation data set (default ``scene_parse150``) through ``tfds.data_source``
  (array_record, no TensorFlow); image and annotation are decoded here with Pillow.

  tfds's scene_parse150 stores the annotation as a 3-channel PNG; channel 0 is taken as the
  class map (0 = other). Note its builder downloads ``annotations_instance`` of the 2017
  Places challenge, whose R channel is documented as the class; check the classes agree
  with the 150 of ADEChallengeData2016 before comparing mIoU with published numbers.
  """

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, name: str = "scene_parse150", split: str = "train",
               data_dir: str | None = None, image_key: str = "image",
               label_key: str = "annotation", reduce_zero_label: bool = True):
    self._data, _ = open_tfds(name, split, data_dir, (image_key, label_key),
                              encoded=(image_key, label_key))
    self.name, self.image_key, self.label_key = name, image_key, label_key
    self.reduce_zero_label = reduce_zero_label
    self.class_names = _ade_names(reduce_zero_label)
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Record:
    record = self._data[index]
    name = f"{self.name}[{index}]"
    return _pair(decode_image(bytes(record[self.image_key]), name),
                 decode_label(bytes(record[self.label_key]), name), name, self.reduce_zero_label)


class DigitCanvasSource:
  """An offline segmentation data set: scikit-learn's 8x8 digits pasted (four per
  image, one per cell of a 2 x 2 grid, 24..32 px at size 64, bilinear, at a
  random place in their cell) in light grey on dark grey textured ``size x size``
  canvases. Label: the digit's class (0..9) where its upsampled intensity is above
  ``HI``, 255 in the stroke-edge band ``(LO, HI]``, background (10) elsewhere.

  Train digits come from the train part of the 1,797 digits, test digits from the held-out
  part (the same ``test_fraction`` / ``split_seed`` split as ``DigitsSource``), so held-out
  mIoU measures generalisation. Example ``i`` is a pure function of (seed, split, i).
  ``mean``/``std`` are measured on the first 32 training canvases, for both splits (a
  model must see the same normalisation in training and in evaluation).
  """

  LO, HI = 0.3, 0.6
  BACKGROUND = 10
  num_classes = 11
  class_names = [str(d) for d in range(10)] + ["background"]

  def __init__(self, split: str, size: int = 64, length: int | None = None,
               test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0):
    try:
      from sklearn.datasets import load_digits
    except ImportError as e:
      raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "test"):
      raise DataError(f"the digit canvases have splits 'train' and 'test', not {split!r}")
    if size < 16:
      raise DataError(f"digit canvases need size >= 16, got {size}")
    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    n_test = int(round(test_fraction * len(order)))
    self.digit_ids = np.sort(order[:n_test] if split == "test" else order[n_test:])
    self._glyphs = digits.images[self.digit_ids] / 16.0
    self._classes = digits.target[self.digit_ids].astype(np.uint8)
    self.split, self.size, self.seed = split, size, seed
    self.length = length if length is not None else (1000 if split == "train" else 200)
    if split == "train":
      pixels = np.stack([np.asarray(self[i].image) for i in range(min(32, self.length))])
      pixels = pixels.reshape(-1, 3) / 255.0
      self.mean = tuple(float(m) for m in pixels.mean(0))
      self.std = tuple(float(s) for s in pixels.std(0))
    else:
      train = DigitCanvasSource("train", size, 32, test_fraction, split_seed, seed)
      self.mean, self.std = train.mean, train.std

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.length:
      raise IndexError(f"digit canvas {index} out of range [0, {self.length})")
    image, label = self.example(index)
    return Record(Image.fromarray(image), label, f"digit canvas {self.split}[{index}]")

  def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Canvas ``index`` as (uint8 ``[size, size, 3]``, uint8 ``[size, size]``)."""
    # A generator of its own per example: random access and thread-safe.
    rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
    n = self.size
    # Background: a dark grey level with coarse blobs and fine noise; digits: light grey.
    # That is the look of the classification quickstart's digits (light strokes on dark),
    # so a backbone trained there transfers (init_from), and the texture makes the net
    # look at shapes rather than at one flat level.
    canvas = np.full((n, n, 1), rng.uniform(0, 60))
    canvas += resize_float(rng.normal(0, 8, (4, 4, 1)), (n, n))
    canvas += rng.normal(0, 4, (n, n, 1))
    canvas = np.clip(canvas, 0, 255)
    label = np.full((n, n), self.BACKGROUND, np.uint8)
    # One digit in each cell of a 2 x 2 grid, at a random scale (3/4 of the cell to all of
    # it) and a random place within it: digits never overlap, and each lies within one cell
    # of the backbone's stride-32 map, where its identity is decided. Four digits, not
    # fewer: with less digit area the identity is learned much later (RESULTS.md).
    cell = n // 2
    for c in range(4):
      k = rng.integers(len(self._classes))
      s = int(rng.integers(3 * cell // 4, cell + 1))
      y = (c // 2) * cell + int(rng.integers(0, cell - s + 1))
      x = (c % 2) * cell + int(rng.integers(0, cell - s + 1))
      alpha = np.clip(resize_float(self._glyphs[k], (s, s)), 0, 1)[..., None]
      region = canvas[y:y + s, x:x + s]
      canvas[y:y + s, x:x + s] = region * (1 - alpha) + rng.uniform(190, 255) * alpha
      patch = label[y:y + s, x:x + s]
      patch[alpha[..., 0] > self.LO] = IGNORE
      patch[alpha[..., 0] > self.HI] = self._classes[k]
    canvas = np.broadcast_to(canvas, (n, n, 3))
    return np.rint(canvas).astype(np.uint8), label


def make_seg_source(cfg: ConfigDict, split: str) -> Any:
  """The ``split`` ("train" or "eval") segmentation source named by ``config.data``."""
  kind = cfg.source
  reduce = bool(cfg.get("reduce_zero_label", True))
  if kind == "digits":
    return DigitCanvasSource("train" if split == "train" else "test", size=cfg.image_size,
                             test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)
  name = cfg.train_split if split == "train" else cfg.eval_split
  if kind == "folder":
    if not cfg.dir:
      raise DataError("config.data.dir must name the ADE20K folder (with images/ and "
                      "annotations/)")
    return ADE20KFolderSource(cfg.dir, name, reduce_zero_label=reduce)
  if kind == "tfds":
    return TfdsSegSource(cfg.name or "scene_parse150", name, cfg.dir or None,
                         cfg.image_key or "image", cfg.label_key or "annotation",
                         reduce_zero_label=reduce)
  raise DataError(f"config.data.source must be 'digits', 'folder' or 'tfds', got {kind!r}")
