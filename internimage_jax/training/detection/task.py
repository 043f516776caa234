"""Object detection and instance segmentation (Mask R-CNN on InternImage) as a training
task: mmdet's COCO pipeline on the host, normalisation and the padding's zero fill on the
device, mmdet's five losses (summed, as mmdet's total), and COCO box and mask AP from
pycocotools over the whole split (detections gathered on the host, at the original
image sizes, as mmdet's ``rescale=True``)."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from internimage_jax import models
from internimage_jax.training import batch_augment, optim
from internimage_jax.training.detection import sources, transforms
from internimage_jax.training.errors import TrainingError
from internimage_jax.training.sources import Record
from internimage_jax.training.tasks import Task, load_system_init

# The COCO summary's entries reported as metrics (pycocotools' ``stats`` order).
_STATS = {"ap": 0, "ap50": 1, "ap75": 2, "ap_small": 3, "ap_medium": 4, "ap_large": 5}
_REPORTED = ("ap", "ap50", "ap75")


class _Example:
  """A detection transform as a pipeline example (the record's label is ``Instances``)."""

  def __init__(self, transform):
    self.transform = transform

  def __call__(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return self.transform(record.image, record.label, rng)

  def blank(self) -> dict[str, np.ndarray]:
    return self.transform.blank()


def _inside(size: jax.Array, height: int, width: int) -> jax.Array:
  rows = jnp.arange(height)[None, :, None] < size[:, 0, None, None]
  cols = jnp.arange(width)[None, None, :] < size[:, 1, None, None]
  return (rows & cols)[..., None]


def coco_results(outputs: dict[str, np.ndarray], category_ids: list[int]) -> list[dict]:
  """One evaluation batch's detections (``boxes``, ``scores``, ``labels``, ``masks``,
  ``num``, ``image_id``, ``original``, ``valid``) as COCO result entries: boxes
  ``[x, y, w, h]`` (mmdet's ``xyxy2xywh``), masks as RLE cut to the original image,
  each with its box's score (``coco_metrics`` gives each evaluation its half)."""
  from pycocotools import mask as mask_utils

  results = []
  for i in np.flatnonzero(outputs["valid"]):
    n = int(outputs["num"][i])
    if n == 0:
      continue
    h, w = (int(v) for v in outputs["original"][i])
    image_id = int(outputs["image_id"][i])
    masks = np.asfortranarray(outputs["masks"][i, :n, :h, :w].transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(masks)
    for box, score, label, rle in zip(outputs["boxes"][i, :n], outputs["scores"][i, :n],
                                      outputs["labels"][i, :n], rles):
      x1, y1, x2, y2 = (float(v) for v in box)
      rle["counts"] = rle["counts"].decode("ascii")
      results.append({"image_id": image_id, "category_id": category_ids[int(label)],
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score),
                      "segmentation": rle})
  return results


def coco_metrics(ground_truth, results: list[dict]) -> tuple[dict[str, float], list[str]]:
  """pycocotools' box and mask AP of ``results`` on ``ground_truth`` (a ``COCO``):
  ``{"bbox_ap", "bbox_ap50", ..., "segm_ap", ...}`` (0 when there is no detection at
  all) and the printed summaries."""
  from pycocotools.cocoeval import COCOeval

  metrics, text = {}, []
  for iou_type in ("bbox", "segm"):
    # One kind of result per evaluation, as mmdet's: pycocotools' loadRes takes a
    # result's area from its box when it has one, also for mask AP's size ranges.
    other = "segmentation" if iou_type == "bbox" else "bbox"
    kind = [{k: v for k, v in r.items() if k != other} for r in results]
    if not kind:
      metrics.update({f"{iou_type}_{k}": 0.0 for k in _REPORTED})
      text.append(f"{iou_type}: no detections")
      continue
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      detections = ground_truth.loadRes(kind)
      evaluation = COCOeval(ground_truth, detections, iou_type)
      evaluation.evaluate()
      evaluation.accumulate()
      evaluation.summarize()
    stats = evaluation.stats
    # pycocotools' -1: no ground truth in the range; reported as NaN, not as a score.
    metrics.update({f"{iou_type}_{k}": float(stats[_STATS[k]]) if stats[_STATS[k]] >= 0
                    else float("nan") for k in _REPORTED})
    # The average precisions, less the size ranges without ground truth (-1).
    text += [f"{iou_type}:"] + [line for line in printed.getvalue().splitlines()
                                 if line.startswith(" Average Precision")
                                 and not line.rstrip().endswith("-1.000")]
  return metrics, text


class Detection(Task):
  """Mask R-CNN with FPN (spec ``detection.md``)."""

  name = "detection"
  primary_metric = "eval/bbox_ap"

  def __init__(self, cfg: ConfigDict, num_classes: int, *args, **kwargs):
    super().__init__(cfg, num_classes, *args, **kwargs)
    canvas = cfg.data.image_size
    if canvas % 32:
      raise TrainingError(f"config.data.image_size {canvas} (the detection canvas) must be a "
                          "multiple of 32")
    self._ground_truth = None
    self._category_ids: list[int] | None = None
    self._summary: dict[str, list[str]] = {}

  @staticmethod
  def make_source(cfg: ConfigDict, split: str) -> Any:
    return sources.make_det_source(cfg.data, split)

  def bind_eval_source(self, source) -> None:
    """Keeps the evaluation split's ground truth and category ids (``coco_metrics``)."""
    self._ground_truth = source.ground_truth()
    self._category_ids = list(source.category_ids)

  # ------------------------------------------------------------------ host
  def _check_scales(self, key: str, scales) -> None:
    """A keep-ratio resize to (long, short) gives sides up to ``long``: the canvas must
    hold them."""
    canvas = self.cfg.data.image_size
    for scale in scales:
      if len(scale) != 2 or min(scale) < 1 or max(scale) > canvas:
        raise ValueError(f"config.{key}: {tuple(scale)} is not a (long, short) size within "
                         f"the {canvas}-pixel canvas (config.data.image_size)")

  def train_example(self):
    aug, data = self.cfg.aug, self.cfg.data
    if not aug.scales:
      raise ValueError("config.aug.scales is empty: the training resize needs a (long, "
                       "short) size")
    self._check_scales("aug.scales", aug.scales)
    self._check_scales("aug.crop_scales", aug.crop_scales)
    lo, hi = aug.crop_range
    if aug.crop_scales and not 1 <= lo <= hi:
      raise ValueError(f"config.aug.crop_range must be 1 <= low <= high, got {(lo, hi)}")
    if data.max_instances < 1:
      raise ValueError(f"config.data.max_instances must be >= 1, got {data.max_instances}")
    return _Example(transforms.DetTrainTransform(
        canvas=data.image_size, scales=tuple(tuple(s) for s in aug.scales), flip=aug.hflip,
        crop_scales=tuple(tuple(s) for s in aug.crop_scales),
        crop_range=tuple(aug.crop_range), max_instances=data.max_instances))

  def eval_example(self):
    self._check_scales("eval.img_scale", [self.cfg.eval.img_scale])
    return _Example(transforms.DetTestTransform(
        canvas=self.cfg.data.image_size, scale=tuple(self.cfg.eval.img_scale),
        mask_canvas=tuple(self.cfg.eval.canvas)))

  # ---------------------------------------------------------------- device
  def model_options(self):
    model = self.cfg.model
    return {"backbone": model.overrides.to_dict(), "neck": model.neck.to_dict(),
            "rpn_head": model.rpn_head.to_dict(), "roi_head": model.roi_head.to_dict(),
            "test_cfg": model.test_cfg.to_dict(), "train_cfg": model.train_cfg.to_dict()}

  @staticmethod
  def create(name, num_classes, options, *, rngs=None, dtype=None, **backbone_runtime):
    # The runtime options (sharding, remat, kernels) are the backbone's. The mmdet dicts
    # are checked by create_detector before anything is built: a one-line error.
    try:
      return models.create_detector(
          name, num_classes=num_classes, rngs=rngs, dtype=dtype,
          backbone={**options.get("backbone", {}), **backbone_runtime},
          **{k: options.get(k) or None
             for k in ("neck", "rpn_head", "roi_head", "test_cfg", "train_cfg")})
    except ValueError as e:
      if not str(e).startswith(("create_detector:", "unknown detector")):
        raise
      raise TrainingError(f"config.model: {e}") from None

  def batch_shapes(self, batch: int, train: bool):
    """The training batch (the train step's input; evaluation batches are not lowered
    ahead)."""
    c, slots = self.cfg.data.image_size, self.cfg.data.max_instances
    return {"image": ((batch, c, c, 3), jnp.uint8), "size": ((batch, 2), jnp.int32),
            "boxes": ((batch, slots, 4), jnp.float32), "labels": ((batch, slots), jnp.int32),
            "masks": ((batch, slots, c, c // 8), jnp.uint8), "num": ((batch,), jnp.int32)}

  def _normalize(self, images: jax.Array, size: jax.Array) -> jax.Array:
    # mmdet pads after normalisation: the padding is 0 in the normalised image.
    x = batch_augment.normalize(images, self.mean, self.std)
    return jnp.where(_inside(size, *images.shape[1:3]), x, 0.0)

  def prepare(self, key, batch):
    """Normalised images, unpacked masks, and a sampling key per image."""
    return {"x": self._normalize(batch["image"], batch["size"]), "size": batch["size"],
            "boxes": batch["boxes"], "labels": batch["labels"], "num": batch["num"],
            "masks": jnp.unpackbits(batch["masks"], axis=-1),
            "keys": jax.random.split(key, batch["image"].shape[0])}

  def loss(self, model, prepared):
    targets = {k: prepared[k] for k in ("boxes", "labels", "masks", "num")}
    losses = model.loss(prepared["x"], targets, key=prepared["keys"],
                        image_shapes=prepared["size"])
    return sum(losses.values())

  def eval_counts(self, model, batch):
    x = self._normalize(batch["image"], batch["size"])
    dets = model(x, batch["size"], original_shapes=batch["original"],
                 mask_shape=tuple(self.cfg.eval.canvas))
    return {**dets, "image_id": batch["image_id"], "original": batch["original"],
            "valid": batch["valid"]}

  def accumulate(self, totals, outputs):
    """Counts are summed; each ``prefix/...`` set of detections becomes COCO results."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, value in outputs.items():
      if "/" in key:
        prefix, name = key.split("/", 1)
        grouped.setdefault(prefix, {})[name] = np.asarray(value)
      else:
        totals[key] = totals.get(key, 0) + np.asarray(value, np.int64)
    for prefix, out in grouped.items():
      totals.setdefault(f"{prefix}/results", []).extend(
          coco_results(out, self._category_ids))

  def metrics(self, totals, count, prefix):
    if self._ground_truth is None:
      raise TrainingError("detection evaluation needs the evaluation split's ground truth "
                          "(Detection.bind_eval_source)")
    metrics, self._summary[prefix] = coco_metrics(self._ground_truth, totals["results"])
    return {f"{prefix}/{k}": v for k, v in metrics.items()}

  def report(self, totals, prefix):
    return [f"  COCO {prefix}: " + line.strip() for line in self._summary.get(prefix, [])]

  def layer_decay_ratios(self, model):
    return optim.segmentation_layer_decay_ratios(model.backbone.depths,
                                                 self.cfg.train.layer_decay)

  def load_init(self, model, path):
    """A Mask R-CNN checkpoint loads whole (the class-count dependent ``fc_cls``,
    ``fc_reg`` and ``conv_logits`` keep their initialisation when the counts differ);
    any other file is a classification checkpoint that initialises the backbone."""
    return load_system_init(model, path, ("backbone.", "neck.", "rpn_head.", "roi_head."),
                            (".fc_cls.", ".fc_reg.", ".conv_logits."), "detector")
