"""Random-access record sources: the quickstart digits, an image folder, any tfds data set.

A source has ``len()``, ``num_classes``, ``mean``/``std`` (for on-device normalisation)
and ``__getitem__(i) -> Record``. Decoding happens in ``__getitem__`` (called from the
input pipeline's worker threads); an image that cannot be decoded comes back as
``Record(image=None, ...)`` so the pipeline can skip and count it instead of crashing.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from internimage_jax.training.augment import IMAGENET_MEAN, IMAGENET_STD, read_rgb
# What torchvision's ImageFolder accepts (the original trains from such a folder).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

log = logging.getLogger(__name__)


class DataError(ValueError):
  """A data set that cannot be used: missing, empty, or inconsistent."""


@dataclasses.dataclass
class Record:
  image: Image.Image | None  # RGB, or None when the file could not be decoded
  label: int | np.ndarray | None  # class index; a uint8 [H, W] map (255 = ignore) for segmentation
  name: str  # file name or record index, for messages about unreadable images


def decode_image(data: bytes | str | os.PathLike, name: str) -> Image.Image | None:
  """Pillow decode to RGB; ``None`` (with a warning) for data Pillow cannot read."""
  try:
    return read_rgb(io.BytesIO(data) if isinstance(data, bytes) else data)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    log.warning("skipping unreadable image %s: %s", name, e)
    return None


class DigitsSource:
  """scikit-learn's 1,797 handwritten digits, upsampled to ``image_size`` (bilinear) as
  grey RGB images, with a fixed held-out split (``test_fraction`` by ``split_seed``)."""

  num_classes = 10

  def __init__(self, split: str, image_size: int = 32, test_fraction: float = 0.2,
               split_seed: int = 0):
    try:
      from sklearn.datasets import load_digits
    except ImportError as e:
      raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "test"):
      raise DataError(f"the digits data set has splits 'train' and 'test', not {split!r}")
    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    n_test = int(round(test_fraction * len(order)))
    chosen = order[:n_test] if split == "test" else order[n_test:]
    self.labels = digits.target[chosen].astype(np.int32)
    self.images = np.stack([_upsample(digits.images[i] / 16.0, image_size) for i in chosen])
    # Normalisation of the whole data set (grey, so one value per channel).
    all_pixels = digits.images / 16.0
    self.mean = (float(all_pixels.mean()),) * 3
    self.std = (float(all_pixels.std()),) * 3

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> Record:
    return Record(Image.fromarray(self.images[index]), int(self.labels[index]), f"digit {index}")


def _upsample(image: np.ndarray, size: int) -> np.ndarray:
  """A grey ``[h, w]`` image in [0, 1] -> ``[size, size, 3]`` uint8 (bilinear in float)."""
  big = Image.fromarray(image.astype(np.float32), mode="F").resize(
      (size, size), Image.Resampling.BILINEAR)
  grey = np.clip(np.rint(np.asarray(big) * 255.0), 0, 255).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


class ImageFolderSource:
  """``root/<split>/<class>/<image>`` as ImageNet is laid out for the original.

  Classes are the sorted folder names of ``class_root`` (the training split), so every
  split maps a class name to the same label.
  """

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, root: str | os.PathLike, split: str, class_root: str | None = None):
    root = Path(root).expanduser()
    if not root.is_dir():
      raise DataError(f"image folder {root} does not exist (config.data.dir)")
    folder = root / split
    classes_from = root / (class_root or split)
    for d in {folder, classes_from}:
      if not d.is_dir():
        raise DataError(f"image folder {root} has no {d.name}/ folder; expected "
                        f"{root}/{d.name}/<class>/<image>")
    self.classes = sorted(e.name for e in os.scandir(classes_from) if e.is_dir())
    if not self.classes:
      raise DataError(f"{classes_from} has no class folders; expected {classes_from}/<class>/<image>")
    index = {name: i for i, name in enumerate(self.classes)}
    self.files: list[str] = []
    labels: list[int] = []
    for name in sorted(e.name for e in os.scandir(folder) if e.is_dir()):
      if name not in index:
        raise DataError(f"{folder}/{name} is not a class of {classes_from}")
      files = sorted(e.path for e in os.scandir(folder / name)
                     if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
      self.files += files
      labels += [index[name]] * len(files)
    if not self.files:
      raise DataError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                      "folders")
    self.labels = np.asarray(labels, np.int32)
    self.num_classes = len(self.classes)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> Record:
    path = self.files[index]
    return Record(decode_image(path, path), int(self.labels[index]), path)


def open_tfds(name: str, split: str, data_dir: str | None, keys: tuple[str, ...],
              encoded: tuple[str, ...]):
  """``(tfds.data_source, features)`` of a prepared tfds data set (array_record; TensorFlow
  is not needed), with the ``encoded`` features left as bytes (decoded with Pillow by the
  source, so a corrupt record is skipped, not fatal); a ``DataError`` naming the problem
  when the set is not prepared, lacks one of ``keys`` or is empty."""
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError("tfds data sets need tensorflow-datasets: "
                      "pip install tensorflow-datasets") from e
  where = f" in {data_dir}" if data_dir else " (default tfds data_dir)"
  try:
    features = tfds.builder(name, data_dir=data_dir or None).info.features
    data = tfds.data_source(name, split=split, data_dir=data_dir or None,
                            decoders={k: tfds.decode.SkipDecoding() for k in encoded
                                      if k in features})
  except Exception as e:  # tfds raises many types; all mean "not usable as configured"
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"tfds data set {name!r} split {split!r}{where} is not available: "
                    f"{first_line}. Prepare it first (tfds build {name}"
                    f"{' --data_dir ' + data_dir if data_dir else ''}, in array_record "
                    "format).") from None
  for key in keys:
    if key not in features:
      raise DataError(f"tfds data set {name!r} has no feature {key!r} "
                      f"(it has {', '.join(features)}); set config.data.image_key/label_key")
  if len(data) == 0:
    raise DataError(f"tfds data set {name!r} split {split!r}{where} is empty")
  return data, features


class TfdsSource:
  """A tfds data set read through ``tfds.data_source`` (array_record; TensorFlow is not
  needed). Images are decoded here with Pillow, so a corrupt record is skipped, not fatal."""

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label"):
    self._data, features = open_tfds(name, split, data_dir, (image_key, label_key),
                                     encoded=(image_key,))
    self.num_classes = int(features[label_key].num_classes)
    self.name, self.image_key, self.label_key = name, image_key, label_key

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> Record:
    record = self._data[index]
    name = f"{self.name}[{index}]"
    return Record(decode_image(bytes(record[self.image_key]), name),
                  int(record[self.label_key]), name)


def make_source(cfg: ConfigDict, split: str) -> Any:
  """The ``split`` ("train" or "eval") source named by ``config.data``."""
  kind = cfg.source
  if kind == "digits":
    return DigitsSource("train" if split == "train" else "test", cfg.image_size,
                        cfg.test_fraction, cfg.split_seed)
  name = cfg.train_split if split == "train" else cfg.eval_split
  if kind == "folder":
    if not cfg.dir:
      raise DataError("config.data.dir must name the image folder (with train/ and val/)")
    return ImageFolderSource(cfg.dir, name, class_root=cfg.train_split)
  if kind == "tfds":
    if not cfg.name:
      raise DataError("config.data.name must name the tfds data set (e.g. imagenet2012)")
    return TfdsSource(cfg.name, name, cfg.dir or None, cfg.image_key, cfg.label_key)
  raise DataError(f"config.data.source must be 'digits', 'folder' or 'tfds', got {kind!r}")
