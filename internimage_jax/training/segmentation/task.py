"""Semantic segmentation (UperNet on InternImage) as a training task: mmseg's ADE20K
pipeline on the host, normalisation and the padding's zero fill on the device, mmseg's
loss, and mIoU / mAcc / aAcc from per-class pixel counts summed over the whole split."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from internimage_jax import models
from internimage_jax.models.segmentation import inference
from internimage_jax.training import batch_augment, optim
from internimage_jax.training.segmentation import sources, transforms
from internimage_jax.training.sources import Record
from internimage_jax.training.tasks import Task, load_system_init


class _TrainExample:
  """``SegTrainTransform`` as a pipeline example: ``image``, ``label``, ``size``."""

  def __init__(self, transform: transforms.SegTrainTransform):
    self.transform = transform

  def __call__(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.transform(record.image, record.label, rng)

  def blank(self) -> dict[str, np.ndarray]:
    return self.transform.blank()


class _EvalExample:
  """One ``SegTestTransform`` per test scale: ``image_i``, ``size_i``, ``fitted_i`` for
  scale ``i``, and the original ``label`` / ``label_size`` once."""

  def __init__(self, scales: list[transforms.SegTestTransform]):
    self.scales = scales

  def _merge(self, outs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    merged = {"label": outs[0]["label"], "label_size": outs[0]["label_size"]}
    for i, out in enumerate(outs):
      merged.update({f"image_{i}": out["image"], f"size_{i}": out["size"],
                     f"fitted_{i}": np.bool_(out["fitted"])})
    return merged

  def __call__(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self._merge([t(record.image, record.label) for t in self.scales])

  def blank(self) -> dict[str, np.ndarray]:
    return self._merge([t.blank() for t in self.scales])


def _inside(size: jax.Array, height: int, width: int) -> jax.Array:
  """``[B, H, W, 1]``: whether each pixel is within its image's ``size`` (h, w)."""
  rows = jnp.arange(height)[None, :, None] < size[:, 0, None, None]
  cols = jnp.arange(width)[None, None, :] < size[:, 1, None, None]
  return (rows & cols)[..., None]


def segmentation_metrics(intersect: np.ndarray, union: np.ndarray,
                         label_area: np.ndarray) -> dict[str, Any]:
  """mmseg's ``total_area_to_metrics``: per-class IoU and accuracy (NaN for a class that
  is absent from both predictions and labels, resp. from the labels), their means over
  the classes that are not NaN (mIoU, mAcc), and the overall pixel accuracy (aAcc)."""
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = intersect / union
    acc = intersect / label_area
    aacc = intersect.sum() / label_area.sum()
  mean = (lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan"))
  return {"iou": iou, "acc": acc, "miou": mean(iou), "macc": mean(acc), "aacc": float(aacc)}


class Segmentation(Task):
  """UperNet semantic segmentation (spec ``segmentation.md``)."""

  name = "segmentation"
  primary_metric = "eval/miou"

  @staticmethod
  def make_source(cfg: ConfigDict, split: str) -> Any:
    return sources.make_seg_source(cfg.data, split)

  # ------------------------------------------------------------------ host
  def train_example(self):
    aug, size = self.cfg.aug, self.cfg.data.image_size
    return _TrainExample(transforms.SegTrainTransform(
        crop=(size, size), img_scale=tuple(aug.img_scale),
        ratio_range=tuple(aug.ratio_range) if aug.ratio_range else None,
        cat_max_ratio=aug.cat_max_ratio, flip=aug.hflip, photometric=aug.photometric))

  def _canvas(self, scale: float) -> tuple[int, int]:
    divisor = self.cfg.eval.size_divisor
    return tuple(int(math.ceil(c * scale / divisor)) * divisor for c in self.cfg.eval.canvas)

  def eval_example(self):
    ev = self.cfg.eval
    return _EvalExample([transforms.SegTestTransform(
        img_scale=tuple(ev.img_scale), size_divisor=ev.size_divisor, canvas=self._canvas(r),
        label_canvas=tuple(ev.label_canvas), ratio=r) for r in ev.scales])

  # ---------------------------------------------------------------- device
  def model_options(self):
    model = self.cfg.model
    return {"backbone": model.overrides.to_dict(), "decode_head": model.decode_head.to_dict(),
            "auxiliary_head": model.auxiliary_head.to_dict() if model.auxiliary else False}

  @staticmethod
  def create(name, num_classes, options, *, rngs=None, dtype=None, **backbone_runtime):
    # The runtime options (sharding, remat, kernels) are the backbone's.
    return models.create_segmentor(
        name, num_classes=num_classes, rngs=rngs, dtype=dtype,
        backbone={**options.get("backbone", {}), **backbone_runtime},
        decode_head=options.get("decode_head"), auxiliary_head=options.get("auxiliary_head"))

  def batch_shapes(self, batch: int, train: bool):
    size = self.cfg.data.image_size
    return {"image": ((batch, size, size, 3), jnp.uint8),
            "label": ((batch, size, size), jnp.uint8), "size": ((batch, 2), jnp.int32)}

  def _normalize(self, images: jax.Array, size: jax.Array) -> jax.Array:
    # mmseg pads after normalisation: the padding is 0 in the normalised image.
    x = batch_augment.normalize(images, self.mean, self.std)
    return jnp.where(_inside(size, *images.shape[1:3]), x, 0.0)

  def prepare(self, key, batch):
    del key  # the augmentation is all on the host
    return {"x": self._normalize(batch["image"], batch["size"]),
            "labels": batch["label"].astype(jnp.int32)}

  def loss(self, model, prepared):
    return model.loss(prepared["x"], prepared["labels"])["loss"]

  def eval_counts(self, model, batch):
    ev = self.cfg.eval
    variants = []
    for i in range(len(ev.scales)):
      size = batch[f"size_{i}"]
      x = self._normalize(batch[f"image_{i}"], size)
      for logits in inference.scale_logits(model, x, size, mode=ev.mode, crop=tuple(ev.crop),
                                           stride=tuple(ev.stride), flip=ev.flip):
        variants.append((logits.astype(jnp.float32), size))
    pred = inference.predict_labels(variants, batch["label_size"], tuple(ev.label_canvas))
    counts = inference.confusion_counts(pred, batch["label"], self.num_classes, batch["valid"])
    counts["fitted"] = jnp.sum(batch["fitted_0"] & batch["valid"])
    return counts

  def metrics(self, totals, count, prefix):
    m = segmentation_metrics(totals["intersect"], totals["union"], totals["label_area"])
    out = {f"{prefix}/miou": m["miou"], f"{prefix}/macc": m["macc"], f"{prefix}/aacc": m["aacc"]}
    if totals["fitted"]:
      out[f"{prefix}/images_shrunk_to_canvas"] = float(totals["fitted"])
    return out

  def report(self, totals, prefix):
    m = segmentation_metrics(totals["intersect"], totals["union"], totals["label_area"])
    cells = [f"{name} {iou:.4f}" for name, iou in zip(self.class_names, m["iou"])]
    return [f"  per-class IoU ({prefix}; nan: class absent): " + ", ".join(cells)]

  def layer_decay_ratios(self, model):
    return optim.segmentation_layer_decay_ratios(model.backbone.depths,
                                                 self.cfg.train.layer_decay)

  def load_init(self, model, path):
    """A segmentation checkpoint (``backbone.*``, ``decode_head.*``, ...) loads whole (a
    ``conv_seg`` of another class count keeps its initialisation); any other file is a
    classification checkpoint that initialises the backbone, as the original's
    ``init_cfg`` (``tasks.load_system_init``)."""
    return load_system_init(model, path, ("backbone.", "decode_head.", "auxiliary_head."),
                            (".conv_seg.",), "segmentor")
