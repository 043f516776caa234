"""mmdet's COCO train and test pipelines on the host (spec ``detection.md`` section 12),
per example in numpy, deterministic given a ``np.random.Generator``.

Examples have static shapes: the image top-left on a zero ``canvas x canvas`` (its
unpadded size in ``size``; normalisation and the "0 after normalisation" padding happen
on the device), and up to ``max_instances`` objects (``num`` of them real): ``boxes``,
``labels`` and ``masks`` packed 8 pixels a byte along the width (``np.packbits``; the
device unpacks them), so a COCO batch of 100 masks at 1344 x 1344 is 23 MB, not 180.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from PIL import Image

from internimage_jax.training.detection.sources import Instances
from internimage_jax.training.segmentation.transforms import (rescale_size, resize_bilinear,
                                                              resize_nearest)
from internimage_jax.training.sources import DataError

log = logging.getLogger(__name__)

Scale = tuple[int, int]  # (long, short), mmcv's keep-ratio target


def _resize(img: np.ndarray, inst: Instances, scale: Scale) -> tuple[np.ndarray, Instances]:
  """mmdet's keep-ratio ``Resize``: bilinear image, nearest masks, boxes times the
  per-axis factors and clipped to the new size."""
  h, w = img.shape[:2]
  new_w, new_h = rescale_size(w, h, scale)
  factors = np.asarray([new_w / w, new_h / h] * 2, np.float32)
  boxes = inst.boxes * factors
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, new_w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, new_h)
  masks = (resize_nearest(inst.masks.transpose(1, 2, 0), (new_h, new_w)).transpose(2, 0, 1)
           if len(inst.masks) else np.zeros((0, new_h, new_w), np.uint8))
  return (resize_bilinear(img, (new_h, new_w)),
          Instances(boxes, inst.labels, np.ascontiguousarray(masks), inst.image_id))


def _flip(img: np.ndarray, inst: Instances) -> tuple[np.ndarray, Instances]:
  w = img.shape[1]
  boxes = inst.boxes.copy()
  boxes[:, 0], boxes[:, 2] = w - inst.boxes[:, 2], w - inst.boxes[:, 0]
  return (np.ascontiguousarray(img[:, ::-1]),
          Instances(boxes, inst.labels, np.ascontiguousarray(inst.masks[:, :, ::-1]),
                    inst.image_id))


def _crop(img: np.ndarray, inst: Instances, size_range: tuple[int, int],
          rng: np.random.Generator) -> tuple[np.ndarray, Instances]:
  """mmdet's ``RandomCrop(crop_type="absolute_range", allow_negative_crop=True)``: a
  crop of random height and width in ``size_range`` (at most the image), at a random
  place; boxes shifted and clipped, those left empty dropped with their masks."""
  h, w = img.shape[:2]
  lo, hi = size_range
  crop_h = int(rng.integers(min(h, lo), min(h, hi) + 1))
  crop_w = int(rng.integers(min(w, lo), min(w, hi) + 1))
  top = int(rng.integers(0, max(h - crop_h, 0) + 1))
  left = int(rng.integers(0, max(w - crop_w, 0) + 1))
  boxes = inst.boxes - np.asarray([left, top, left, top], np.float32)
  boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, crop_w)
  boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, crop_h)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  masks = inst.masks[keep, top:top + crop_h, left:left + crop_w]
  return (img[top:top + crop_h, left:left + crop_w],
          Instances(boxes[keep], inst.labels[keep], np.ascontiguousarray(masks), inst.image_id))


def _as_array(image: Image.Image | np.ndarray, inst: Instances) -> np.ndarray:
  img = np.asarray(image, np.uint8)
  if img.ndim != 3 or img.shape[2] != 3 or inst.masks.shape[1:] != img.shape[:2]:
    raise ValueError(f"image {img.shape} and masks {inst.masks.shape} do not match "
                     "([H, W, 3] and [N, H, W])")
  return img


@dataclasses.dataclass(frozen=True)
class DetTrainTransform:
  """mmdet's COCO train pipeline after loading: horizontal flip with probability
  ``flip``; then either a keep-ratio resize to one of ``scales`` (uniformly; the 1x
  recipe has one) or -- with probability one half when ``crop_scales`` is set (the 3x
  recipe's AutoAugment) -- a resize to one of ``crop_scales``, a random crop with sides
  in ``crop_range``, and the resize to one of ``scales``; pad on the canvas."""

  canvas: int
  scales: tuple[Scale, ...] = ((1333, 800),)
  flip: float = 0.5
  crop_scales: tuple[Scale, ...] = ()
  crop_range: tuple[int, int] = (384, 600)
  max_instances: int = 100

  def __call__(self, image: Image.Image | np.ndarray, inst: Instances,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    img = _as_array(image, inst)
    if rng.random() < self.flip:
      img, inst = _flip(img, inst)
    if self.crop_scales and rng.integers(2) == 1:
      img, inst = _resize(img, inst, self.crop_scales[rng.integers(len(self.crop_scales))])
      img, inst = _crop(img, inst, self.crop_range, rng)
    img, inst = _resize(img, inst, self.scales[rng.integers(len(self.scales))])
    return _padded(img, inst, self.canvas, self.max_instances)

  def blank(self) -> dict[str, np.ndarray]:
    return _blank(self.canvas, self.max_instances)


@dataclasses.dataclass(frozen=True)
class DetTestTransform:
  """mmdet's COCO test pipeline: keep-ratio resize to ``scale``, padded on the canvas;
  with the original size (the detections are returned at it, on a ``mask_canvas`` (h,
  w) that must hold it) and the image's id. One deviation, for static shapes: mmdet pads
  each image to a multiple of 32; here every image is padded to the whole canvas, so
  the features near its bottom and right edges see a larger zero border (the strides
  align the same way: the canvas is a multiple of 32)."""

  canvas: int
  scale: Scale = (1333, 800)
  mask_canvas: tuple[int, int] = (640, 640)

  def __call__(self, image: Image.Image | np.ndarray, inst: Instances,
               rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    del rng  # deterministic
    img = np.asarray(image, np.uint8)
    h, w = img.shape[:2]
    if h > self.mask_canvas[0] or w > self.mask_canvas[1]:
      raise DataError(f"an image of {h}x{w} (h x w) does not fit config.eval.canvas "
                      f"{self.mask_canvas} (the detections' masks are at the original size); "
                      "raise it")
    new_w, new_h = rescale_size(w, h, self.scale)
    _check_canvas(new_h, new_w, self.canvas)
    out = self.blank()
    out["image"][:new_h, :new_w] = resize_bilinear(img, (new_h, new_w))
    out["size"][:] = (new_h, new_w)
    out["original"][:] = (h, w)
    out["image_id"] = np.int32(inst.image_id)
    return out

  def blank(self) -> dict[str, np.ndarray]:
    c = self.canvas
    return dict(image=np.zeros((c, c, 3), np.uint8), size=np.zeros(2, np.int32),
                original=np.zeros(2, np.int32), image_id=np.int32(-1))


def _check_canvas(h: int, w: int, canvas: int) -> None:
  if h > canvas or w > canvas:
    raise DataError(f"a resized image of {h}x{w} (h x w) does not fit the {canvas}x{canvas} "
                    "canvas (config.data.image_size); raise it or lower the scales")


def _blank(canvas: int, slots: int) -> dict[str, np.ndarray]:
  return dict(image=np.zeros((canvas, canvas, 3), np.uint8), size=np.zeros(2, np.int32),
              boxes=np.zeros((slots, 4), np.float32), labels=np.zeros(slots, np.int32),
              masks=np.zeros((slots, canvas, canvas // 8), np.uint8), num=np.int32(0))


def _padded(img: np.ndarray, inst: Instances, canvas: int, slots: int) -> dict[str, np.ndarray]:
  h, w = img.shape[:2]
  _check_canvas(h, w, canvas)
  n = len(inst.labels)
  if n > slots:
    log.warning("image %s has %d instances; the first %d are kept (config.data.max_instances)",
                inst.image_id, n, slots)
    n = slots
  out = _blank(canvas, slots)
  out["image"][:h, :w] = img
  out["size"][:] = (h, w)
  out["boxes"][:n] = inst.boxes[:n]
  out["labels"][:n] = inst.labels[:n]
  full = np.zeros((n, h, canvas), np.uint8)
  full[:, :, :w] = inst.masks[:n]
  out["masks"][:n, :h] = np.packbits(full, axis=-1)
  out["num"] = np.int32(n)
  return out
