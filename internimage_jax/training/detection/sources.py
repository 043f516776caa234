"""Random-access detection sources: COCO 2017 as released (``train2017/``, ``val2017/``,
``annotations/instances_*.json``), tfds's ``coco/2017`` (images from tfds, instances from
the same JSON files: tfds's COCO has boxes but no instance masks), and an offline data set
of digits at random places and scales on textured canvases.

A source has ``len()``, ``num_classes``, ``class_names``, ``mean``/``std``,
``category_ids`` (label -> COCO category id) and ``__getitem__(i) -> Record`` whose
``label`` is an :class:`Instances`; ``ground_truth()`` gives the split as a pycocotools
``COCO`` object for evaluation. Instances follow mmdet's ``CocoDataset``: crowd regions
and degenerate boxes are left out, labels are the categories' ranks by id.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ml_collections import ConfigDict
from PIL import Image

from internimage_jax.training.augment import IMAGENET_MEAN, IMAGENET_STD
from internimage_jax.training.segmentation.transforms import resize_float
from internimage_jax.training.sources import DataError, Record, decode_image, open_tfds

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Instances:
  """An image's objects in its own pixels: ``boxes`` float32 ``[N, 4]`` (x1, y1, x2, y2),
  ``labels`` int32 ``[N]`` (0..C-1), ``masks`` uint8 ``[N, H, W]`` (0/1), and the image's
  id in the split's ``ground_truth()``."""

  boxes: np.ndarray
  labels: np.ndarray
  masks: np.ndarray
  image_id: int


def _pycocotools():
  try:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
  except ImportError as e:
    raise ImportError("COCO data and evaluation need pycocotools: pip install pycocotools") from e
  return COCO, mask_utils


def coco_from_dict(dataset: dict[str, Any]):
  """A pycocotools ``COCO`` of an in-memory annotation dict (its index prints nothing)."""
  COCO, _ = _pycocotools()
  coco = COCO()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


class CocoAnnotations:
  """``annotations/instances_<split>.json`` read with pycocotools, and mmdet's rules for
  which images a split keeps and which instances an image has."""

  def __init__(self, path: str | os.PathLike, train: bool):
    path = Path(path).expanduser()
    if not path.is_file():
      raise DataError(f"COCO annotation file {path} does not exist")
    try:
      with open(path, "rb") as f:
        dataset = json.load(f)
      self.coco = coco_from_dict(dataset)
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(f"COCO annotation file {path} is not readable: {e}") from None
    self.category_ids = sorted(self.coco.getCatIds())
    if not self.category_ids:
      raise DataError(f"COCO annotation file {path} has no categories")
    self.class_names = [self.coco.cats[c]["name"] for c in self.category_ids]
    self._label = {c: i for i, c in enumerate(self.category_ids)}
    ids = sorted(self.coco.getImgIds())
    if train:
      # mmdet's _filter_imgs (filter_empty_gt, min_size 32): images with an annotation of
      # a known category, crowd ones included (such an image trains with no object).
      annotated = {a["image_id"] for a in self.coco.dataset.get("annotations", [])
                   if a["category_id"] in self._label}
      ids = [i for i in ids if i in annotated
             and min(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) >= 32]
    self.image_ids = ids
    self.path = path

  def file_name(self, image_id: int) -> str:
    return self.coco.imgs[image_id]["file_name"]

  def instances(self, image_id: int, width: int, height: int) -> Instances:
    """mmdet's ``_parse_ann_info``: boxes ``[x, y, x + w, y + h]`` of the non-crowd
    annotations that overlap the image with ``w, h >= 1`` and a positive area; masks
    decoded (polygons or RLE) at the image's size."""
    _, mask_utils = _pycocotools()
    boxes, labels, masks = [], [], []
    for ann in self.coco.imgToAnns.get(image_id, []):
      x, y, w, h = ann["bbox"]
      inter_w = max(0, min(x + w, width) - max(x, 0))
      inter_h = max(0, min(y + h, height) - max(y, 0))
      if (inter_w * inter_h == 0 or ann.get("area", w * h) <= 0 or w < 1 or h < 1
          or ann.get("iscrowd", 0) or ann["category_id"] not in self._label):
        continue
      boxes.append([x, y, x + w, y + h])
      labels.append(self._label[ann["category_id"]])
      segm = ann.get("segmentation")
      if isinstance(segm, list):  # polygons
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
      elif isinstance(segm, dict) and isinstance(segm.get("counts"), list):  # raw RLE
        rle = mask_utils.frPyObjects(segm, height, width)
      elif segm:
        rle = segm
      else:
        rle = None
      masks.append(np.zeros((height, width), np.uint8) if rle is None
                   else mask_utils.decode(rle).astype(np.uint8))
    return Instances(np.asarray(boxes, np.float32).reshape(-1, 4),
                     np.asarray(labels, np.int32),
                     np.stack(masks) if masks else np.zeros((0, height, width), np.uint8),
                     image_id)


def _record(image: Image.Image | None, annotations: CocoAnnotations, image_id: int,
            name: str) -> Record:
  if image is None:
    return Record(None, None, name)
  info = annotations.coco.imgs[image_id]
  if (info["width"], info["height"]) != image.size:
    log.warning("skipping %s: the image is %dx%d, its annotations say %dx%d (w x h)", name,
                *image.size, info["width"], info["height"])
    return Record(None, None, name)
  return Record(image, annotations.instances(image_id, *image.size), name)


class CocoFolderSource:
  """COCO as released: ``root/<split>/*.jpg`` (``train2017``, ``val2017``) and
  ``root/annotations/instances_<split>.json``, images in the order of their ids. Training
  splits keep the images with at least one annotation and sides >= 32 (mmdet)."""

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, root: str | os.PathLike, split: str, train: bool):
    root = Path(root).expanduser()
    if not root.is_dir():
      raise DataError(f"COCO folder {root} does not exist (config.data.dir)")
    images = root / split
    if not images.is_dir():
      raise DataError(f"COCO folder {root} has no {split}/ folder; expected {root}/{split}/*.jpg "
                      f"and {root}/annotations/instances_{split}.json")
    self.annotations = CocoAnnotations(root / "annotations" / f"instances_{split}.json", train)
    self.images = images
    self.category_ids = self.annotations.category_ids
    self.class_names = self.annotations.class_names
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self.annotations.image_ids)

  def __getitem__(self, index: int) -> Record:
    image_id = self.annotations.image_ids[index]
    path = str(self.images / self.annotations.file_name(image_id))
    return _record(decode_image(path, path), self.annotations, image_id, path)

  def ground_truth(self):
    return self.annotations.coco


class TfdsCocoSource:
  """tfds's ``coco/2017`` images (``image``, ``image/id``) with the instances of the COCO
  annotation file ``annotations`` (tfds's COCO holds boxes but no instance masks). Records
  whose id the file does not have are left out."""

  mean, std = IMAGENET_MEAN, IMAGENET_STD

  def __init__(self, name: str, split: str, data_dir: str | None, annotations: str,
               train: bool):
    if not annotations:
      raise DataError("tfds's coco/2017 has no instance masks: set config.data.annotations to "
                      f"the folder holding COCO's instances_*.json ({name!r} split {split!r})")
    self._data, _ = open_tfds(name, split, data_dir, ("image", "image/id"), encoded=("image",))
    json_split = {"train": "train2017", "validation": "val2017"}.get(split, split)
    self.annotations = CocoAnnotations(Path(annotations) / f"instances_{json_split}.json", train)
    kept = set(self.annotations.image_ids)
    ids = np.asarray([int(self._data[i]["image/id"]) for i in range(len(self._data))])
    self._rows = [i for i, image_id in enumerate(ids) if image_id in kept]
    self._ids = ids
    if not self._rows:
      raise DataError(f"no image of tfds {name!r} split {split!r} is in "
                      f"{self.annotations.path}")
    self.name = name
    self.category_ids = self.annotations.category_ids
    self.class_names = self.annotations.class_names
    self.num_classes = len(self.class_names)

  def __len__(self) -> int:
    return len(self._rows)

  def __getitem__(self, index: int) -> Record:
    row = self._rows[index]
    name = f"{self.name}[{row}]"
    image = decode_image(bytes(self._data[row]["image"]), name)
    return _record(image, self.annotations, int(self._ids[row]), name)

  def ground_truth(self):
    """The annotation file's images that tfds holds."""
    coco = self.annotations.coco
    ids = {int(self._ids[r]) for r in self._rows}
    return coco_from_dict({**coco.dataset,
                           "images": [coco.imgs[i] for i in sorted(ids)],
                           "annotations": [a for a in coco.dataset["annotations"]
                                           if a["image_id"] in ids]})


class DigitDetectionSource:
  """An offline instance-segmentation data set: 2 to 4 of scikit-learn's 8x8 digits per
  ``size x size`` canvas (light grey on textured dark grey, as the other digit sets), each
  at a random scale (``size/5`` to ``size/2.4`` px, bilinear) and place, overlapping
  another's box by at most a fifth of the smaller one. An instance's mask is where its
  upsampled stroke is above one half (drawn over: what later digits cover is removed),
  its box the mask's extent, its class the digit (10 classes).

  Train and test digits come from disjoint parts of the 1,797 (``DigitsSource``'s split),
  so held-out AP measures generalisation. Example ``i`` is a pure function of (seed,
  split, i); ``mean``/``std`` are those of the first 32 training canvases for both splits.
  """

  num_classes = 10
  class_names = [str(d) for d in range(10)]
  category_ids = list(range(1, 11))

  def __init__(self, split: str, size: int = 96, length: int | None = None,
               test_fraction: float = 0.2, split_seed: int = 0, seed: int = 0):
    try:
      from sklearn.datasets import load_digits
    except ImportError as e:
      raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    if split not in ("train", "test"):
      raise DataError(f"the digit canvases have splits 'train' and 'test', not {split!r}")
    if size < 32:
      raise DataError(f"digit detection canvases need size >= 32, got {size}")
    digits = load_digits()
    order = np.random.default_rng(split_seed).permutation(len(digits.target))
    n_test = int(round(test_fraction * len(order)))
    ids = np.sort(order[:n_test] if split == "test" else order[n_test:])
    self._glyphs = digits.images[ids] / 16.0
    self._classes = digits.target[ids].astype(np.int32)
    self.split, self.size, self.seed = split, size, seed
    self.length = length if length is not None else (2000 if split == "train" else 200)
    if split == "train":
      pixels = np.stack([self.example(i)[0] for i in range(min(32, self.length))])
      pixels = pixels.reshape(-1, 3) / 255.0
      self.mean = tuple(float(m) for m in pixels.mean(0))
      self.std = tuple(float(s) for s in pixels.std(0))
    else:
      train = DigitDetectionSource("train", size, 32, test_fraction, split_seed, seed)
      self.mean, self.std = train.mean, train.std

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> Record:
    if not 0 <= index < self.length:
      raise IndexError(f"digit canvas {index} out of range [0, {self.length})")
    image, instances = self.example(index)
    return Record(Image.fromarray(image), instances, f"digit canvas {self.split}[{index}]")

  def example(self, index: int) -> tuple[np.ndarray, Instances]:
    """Canvas ``index``: uint8 ``[size, size, 3]`` and its instances."""
    rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
    n = self.size
    canvas = np.full((n, n, 1), rng.uniform(0, 60))
    canvas += resize_float(rng.normal(0, 8, (4, 4, 1)), (n, n))
    canvas += rng.normal(0, 4, (n, n, 1))
    canvas = np.clip(canvas, 0, 255)
    placed: list[tuple[int, int, int, int]] = []
    masks, labels = [], []
    for _ in range(int(rng.integers(2, 5))):
      for _attempt in range(20):
        s = int(rng.integers(n // 5, int(n / 2.4) + 1))
        y, x = (int(v) for v in rng.integers(0, n - s + 1, size=2))
        if all(_overlap((x, y, x + s, y + s), b) <= 0.2 for b in placed):
          break
      else:
        continue  # no room left
      k = int(rng.integers(len(self._classes)))
      alpha = np.clip(resize_float(self._glyphs[k], (s, s)), 0, 1)
      region = canvas[y:y + s, x:x + s]
      canvas[y:y + s, x:x + s] = region * (1 - alpha[..., None]) + rng.uniform(190, 255) * alpha[..., None]
      mask = np.zeros((n, n), np.uint8)
      mask[y:y + s, x:x + s] = alpha > 0.5
      for earlier in masks:  # the new stroke covers the earlier digits
        earlier &= 1 - mask
      masks.append(mask)
      labels.append(int(self._classes[k]))
      placed.append((x, y, x + s, y + s))
    boxes, kept_masks, kept_labels = [], [], []
    for mask, label in zip(masks, labels):
      rows, cols = np.nonzero(mask)
      if rows.size:
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        kept_masks.append(mask)
        kept_labels.append(label)
    image = np.rint(np.broadcast_to(canvas, (n, n, 3))).astype(np.uint8)
    return image, Instances(np.asarray(boxes, np.float32).reshape(-1, 4),
                            np.asarray(kept_labels, np.int32),
                            np.stack(kept_masks) if kept_masks else np.zeros((0, n, n), np.uint8),
                            index + 1)

  def ground_truth(self):
    """The split's canvases as a COCO data set (ids ``index + 1``, masks as RLE)."""
    _, mask_utils = _pycocotools()
    images, annotations = [], []
    for index in range(self.length):
      _, inst = self.example(index)
      images.append({"id": inst.image_id, "width": self.size, "height": self.size,
                     "file_name": f"{index}.png"})
      for box, label, mask in zip(inst.boxes, inst.labels, inst.masks):
        rle = mask_utils.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        x1, y1, x2, y2 = (float(v) for v in box)
        annotations.append({"id": len(annotations) + 1, "image_id": inst.image_id,
                            "category_id": self.category_ids[label], "iscrowd": 0,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "area": float(mask.sum()),
                            "segmentation": rle})
    categories = [{"id": c, "name": n} for c, n in zip(self.category_ids, self.class_names)]
    return coco_from_dict({"images": images, "annotations": annotations,
                           "categories": categories})


def _overlap(a: tuple[int, ...], b: tuple[int, ...]) -> float:
  """Intersection of two boxes over the smaller's area."""
  w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
  return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def make_det_source(cfg: ConfigDict, split: str) -> Any:
  """The ``split`` ("train" or "eval") detection source named by ``config.data``."""
  kind, train = cfg.source, split == "train"
  if kind == "digits":
    return DigitDetectionSource("train" if train else "test", size=cfg.image_size,
                                test_fraction=cfg.test_fraction, split_seed=cfg.split_seed)
  name = cfg.train_split if train else cfg.eval_split
  if kind == "folder":
    if not cfg.dir:
      raise DataError("config.data.dir must name the COCO folder (with train2017/, val2017/ "
                      "and annotations/)")
    return CocoFolderSource(cfg.dir, name, train)
  if kind == "tfds":
    return TfdsCocoSource(cfg.name or "coco/2017", name, cfg.dir or None, cfg.annotations,
                          train)
  raise DataError(f"config.data.source must be 'digits', 'folder' or 'tfds', got {kind!r}")
