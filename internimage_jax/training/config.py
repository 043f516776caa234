"""The training config schema: every key with its default, and validation.

Experiment files (``configs/*.py``) start from ``base_config()`` and change values; a
key that is not in the schema (a typo in a config file) is reported by ``validate`` with
the nearest valid names, and ``--config.x=v`` overrides of unknown keys are refused by
ml_collections (the config is locked).
"""

from __future__ import annotations

import difflib
import inspect

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

from internimage_jax.models.partitioning import DEFAULT_RULES
from pallas_kernels.dcnv3.api import IMPLEMENTATIONS

RECIPE_RANDAUGMENT = "rand-m9-mstd0.5-inc1"


def base_config() -> ConfigDict:
  """Defaults = the original from-scratch ImageNet-1K recipe (InternImage-T)."""
  cfg = ConfigDict()
  cfg.seed = 0
  cfg.task = "classification"  # or "segmentation" (UperNet), "detection" (Mask R-CNN)
  cfg.mode = "train"  # or "eval": evaluate init_from (or the workdir's latest) and stop
  cfg.init_from = ""  # official .pth / .safetensors / converted dir; new head if classes differ
  cfg.model = ConfigDict(dict(
      name="internimage_t",  # segmentation: upernet_internimage_{t,s,b,l,xl,h}
      # Any InternImage constructor option (channels, depths, drop_path_rate, ...).
      overrides=ConfigDict(dict(drop_path_rate=0.1)),
      # Segmentation: UperHead / FCNHead options over the official ones; auxiliary=False
      # trains without the auxiliary FCN head.
      decode_head=ConfigDict(), auxiliary_head=ConfigDict(), auxiliary=True,
      # Detection: mmdet's own keys (without type) over the official Mask R-CNN
      # configuration (create_detector checks them).
      neck=ConfigDict(), rpn_head=ConfigDict(), roi_head=ConfigDict(), test_cfg=ConfigDict(),
      train_cfg=ConfigDict(),
      # Recompute each block in the backward pass: "none", "block" (keep only block
      # inputs) or "dots" (also keep matmul outputs). Trades compute for activations.
      remat="none",
      # DCNv3 sampling: "auto" (the Pallas kernels on GPUs, per device on any mesh),
      # "xla" (the fallback), "pallas", "pallas_triton" or "pallas_mosaic".
      implementation="auto",
  ))
  cfg.data = ConfigDict(dict(
      source="tfds",  # "tfds" (tfds.data_source), "folder" (dir/train/<class>/*), "digits"
      name="imagenet2012",  # tfds name
      dir="",  # tfds data_dir, or the image folder's root
      train_split="train", eval_split="validation",  # folder: "train" and "val"
      image_key="image", label_key="label",  # tfds feature names
      image_size=224,
      threads=8,  # host threads decoding and augmenting per process
      prefetch=2,  # whole batches prepared ahead per process
      eval_batch=0,  # global evaluation batch; 0 = the training global batch
      test_fraction=0.2, split_seed=0,  # digits only: the fixed held-out split
      # Segmentation: label 0 is "other" (ADE20K): 0 -> 255 (ignored), v -> v - 1.
      reduce_zero_label=False,
      # Detection: the folder of COCO's instances_*.json (tfds's coco/2017 has no instance
      # masks), and the object slots per training image (more are dropped, with a warning).
      annotations="", max_instances=100,
  ))
  cfg.aug = ConfigDict(dict(
      random_resized_crop=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),  # bicubic
      hflip=0.5,
      randaugment=RECIPE_RANDAUGMENT,  # "" = off
      reprob=0.25,  # random erasing (pixel mode, one box)
      mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5,  # 0, 0 = off
      # Segmentation (mmseg's pipeline; the crop is data.image_size): keep-ratio resize to
      # img_scale (long, short) times U(ratio_range), crop with cat_max_ratio, hflip,
      # photometric distortion, pad with label 255.
      img_scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio=0.75, photometric=True,
      # Detection (mmdet's pipeline; the canvas is data.image_size square): flip, then a
      # keep-ratio resize to one of scales (long, short); with crop_scales, half the images
      # are resized to one of those, cropped (sides in crop_range) and then resized.
      scales=((1333, 800),), crop_scales=(), crop_range=(384, 600),
  ))
  cfg.train = ConfigDict(dict(
      global_batch=4096,  # the original's 32 GPUs x 128 (or 8 x 512)
      accum_steps=1,  # gradient accumulation: micro-batches of global_batch / accum_steps
      epochs=300.0, warmup_epochs=20.0,
      steps=0, warmup_steps=0,  # iterations, when set, instead of epochs / warmup_epochs
      lr=5e-4, warmup_lr=5e-7, min_lr=5e-6,  # per lr_batch images, scaled by global_batch
      lr_batch=512,  # 0: the learning rates are used as they are (mmseg's recipes)
      schedule="cosine",  # or "poly": (1 - t/T) ** power, warmup ratio warmup_ratio
      power=1.0, warmup_ratio=1e-6,
      decay_epochs=(), decay_rate=0.1,  # "step": lr x decay_rate at each of these epochs
      weight_decay=0.05, clip_grad=5.0, label_smoothing=0.1,  # clip_grad 0: no clipping
      layer_decay=0.0,  # layer-wise LR decay ratio (0 = off), counted from the last block
      dcn_lr_mul=1.0,  # LR multiplier of dcn.offset and dcn.center_feature_scale_proj
      ema_decay=0.9999,  # 0 = no EMA
      compute_dtype="float32",  # or "bfloat16" (float32 master weights and optimizer)
  ))
  # axis -> size; one may be -1 (the rest). data: batch only; fsdp: batch, parameters
  # and optimizer state; model: tensor parallelism of the MLP and clip-projector linears.
  cfg.mesh = ConfigDict(dict(data=-1, fsdp=1, model=1))
  # Parameter placement: logical axis (models/partitioning.py) -> mesh axis or None
  # (whole). The default splits channels over fsdp and the MLP and attention features
  # over model; e.g. embed=None keeps the parameters whole on every device. Every rule
  # is a string field, so the command line can set it (--config.axis_rules.layers=model,
  # --config.axis_rules.embed=None); axis_rules() reads "None" as None.
  cfg.axis_rules = ConfigDict({name: placeholder(str) if axis is None else axis
                               for name, axis in DEFAULT_RULES.items()})
  # Detection evaluation: test images resized keep-ratio to eval.img_scale on the
  # data.image_size canvas; boxes and masks at the original size, masks on a canvas of
  # eval.canvas (h, w) that must hold every original image.
  # Segmentation evaluation (models/segmentation/inference.py): "whole" or "slide"
  # (windows of crop every stride); each test image resized keep-ratio to
  # eval.img_scale times each of scales, sides rounded up to size_divisor, on a canvas
  # of canvas (h, w) pixels times the scale; labels at the original size on label_canvas.
  cfg.eval = ConfigDict(dict(mode="whole", crop=(512, 512), stride=(341, 341), flip=False,
                             scales=(1.0,), img_scale=(2048, 512), size_divisor=32,
                             canvas=(1024, 1024), label_canvas=(2048, 2048)))
  cfg.checkpoint = ConfigDict(dict(every_steps=0, keep=3))  # 0 = once per epoch
  cfg.log_every_steps = 50
  cfg.eval_every_steps = 0  # 0 = once per epoch; -1 = never (not even after the last step)
  return cfg


def fine_tune(cfg: ConfigDict) -> ConfigDict:
  """The original 22K -> 1K fine-tuning recipe on top of ``cfg`` (20 epochs)."""
  cfg.train.update(epochs=20.0, warmup_epochs=2.0, lr=2e-5, warmup_lr=0.0, min_lr=0.0,
                   label_smoothing=0.3, layer_decay=0.9, dcn_lr_mul=0.1, global_batch=512)
  cfg.aug.update(mixup=0.0, cutmix=0.0, reprob=0.0)
  return cfg


def upernet_ade20k(cfg: ConfigDict, size: str, lr: float, layer_decay: float,
                   clip_grad: float) -> ConfigDict:
  """The original UperNet ADE20K recipe (spec ``segmentation.md`` section 7) for
  ``upernet_internimage_<size>`` at its crop size: 160k iterations of batch 16, AdamW
  with layer decay (1.0: none) and the no-decay rules, poly schedule with 1,500
  warmup iterations, batch statistics over the global batch (the original's SyncBN),
  whole-image evaluation every 16k iterations. Data: the ADEChallengeData2016 folder."""
  from internimage_jax.models.segmentation.segmentor import CROP_SIZES

  crop = CROP_SIZES[f"upernet_internimage_{size}"]
  scale = crop / 512
  cfg.task = "segmentation"
  cfg.model.update(name=f"upernet_internimage_{size}", auxiliary=True)
  cfg.model.overrides = ConfigDict()  # the official backbone (update() would merge)
  cfg.data.update(source="folder", name="", train_split="training", eval_split="validation",
                  image_size=crop, reduce_zero_label=True, eval_batch=0)
  cfg.aug.update(img_scale=(int(2048 * scale), crop), ratio_range=(0.5, 2.0),
                 cat_max_ratio=0.75, hflip=0.5, photometric=True)
  cfg.train.update(global_batch=16, steps=160_000, warmup_steps=1500, schedule="poly",
                   power=1.0, warmup_ratio=1e-6, lr=lr, min_lr=0.0, lr_batch=0,
                   weight_decay=0.05, clip_grad=clip_grad, layer_decay=layer_decay,
                   dcn_lr_mul=1.0, label_smoothing=0.0, ema_decay=0.0)
  # Test images: short side `crop`, long side at most 4 crops; the canvas holds aspect
  # ratios up to 2:1 at full size (wider ones are shrunk to fit and counted).
  cfg.eval.update(mode="whole", img_scale=(int(2048 * scale), crop), scales=(1.0,),
                  flip=False, crop=(crop, crop), stride=(int(crop * 2 / 3), int(crop * 2 / 3)),
                  canvas=(2 * crop, 2 * crop), label_canvas=(2048, 2048))
  cfg.checkpoint.update(every_steps=16_000, keep=3)
  cfg.eval_every_steps = 16_000
  return cfg


def mask_rcnn_coco(cfg: ConfigDict, size: str, schedule: str) -> ConfigDict:
  """The original Mask R-CNN COCO recipe (spec ``detection.md`` section 12) for
  ``mask_rcnn_internimage_<size>``, ``schedule`` "1x" (12 epochs, lr x0.1 after 8 and
  11, one scale) or "3x" (36 epochs, after 27 and 33, multi-scale with random crops):
  batch 16, AdamW lr 1e-4 and weight decay 0.05 (none on norms and biases), no layer
  decay and no clipping, 500 linear warmup iterations from 0.001, backbone from the
  ImageNet-1K classifier. Data: COCO 2017's folder layout; images resized keep-ratio to
  fit (1333, 800) on a 1344 x 1344 canvas (both orientations), evaluated once per epoch
  at the original sizes (COCO's images are at most 640 px a side)."""
  if schedule not in ("1x", "3x"):
    raise ValueError(f"the Mask R-CNN COCO schedules are '1x' and '3x', not {schedule!r}")
  cfg.task = "detection"
  cfg.model.name = f"mask_rcnn_internimage_{size}"
  cfg.model.overrides = ConfigDict()  # the official backbone (update() would merge)
  cfg.init_from = "in1k"
  cfg.data.update(source="folder", name="", train_split="train2017", eval_split="val2017",
                  image_size=1344, max_instances=100, eval_batch=0)
  multi_scale = tuple((1333, short) for short in range(480, 801, 32))
  cfg.aug.update(scales=((1333, 800),) if schedule == "1x" else multi_scale, hflip=0.5,
                 crop_scales=() if schedule == "1x" else ((1333, 400), (1333, 500), (1333, 600)),
                 crop_range=(384, 600))
  epochs, decay = (12, (8, 11)) if schedule == "1x" else (36, (27, 33))
  cfg.train.update(global_batch=16, epochs=float(epochs), steps=0, warmup_steps=500,
                   schedule="step", decay_epochs=decay, decay_rate=0.1, warmup_ratio=0.001,
                   lr=1e-4, lr_batch=0, min_lr=0.0, weight_decay=0.05, clip_grad=0.0,
                   layer_decay=0.0, dcn_lr_mul=1.0, label_smoothing=0.0, ema_decay=0.0)
  cfg.eval.update(img_scale=(1333, 800), canvas=(640, 640))
  cfg.checkpoint.update(every_steps=0, keep=3)
  cfg.eval_every_steps = 0
  return cfg


VARIANTS = {
    "bf16": "bfloat16 compute, float32 master weights and optimizer state",
    "fsdp": "parameters and optimizer state sharded over all devices (mesh data=1, fsdp=-1)",
    "folder": "read an image folder (config.data.dir with train/<class>/* and val/<class>/*)",
    "tfds": "detection: tfds's coco/2017 images with config.data.annotations' instances",
}


def apply_variants(cfg: ConfigDict, variants: str | None) -> ConfigDict:
  """Applies comma-separated hardware/data variants (``VARIANTS``) of a config string."""
  for variant in filter(None, (v.strip() for v in (variants or "").split(","))):
    if variant == "bf16":
      cfg.train.compute_dtype = "bfloat16"
    elif variant == "fsdp":
      cfg.mesh.update(data=1, fsdp=-1)
    elif variant == "tfds":
      if cfg.task != "detection":
        raise ValueError("config variant 'tfds' is for the COCO detection configs (their data "
                         "from tfds's coco/2017); set config.data.source=tfds instead")
      cfg.data.update(source="tfds", name="coco/2017", train_split="train",
                      eval_split="validation")
    elif variant == "folder":
      cfg.data.update(source="folder", train_split="train", eval_split="val")
    else:
      raise ValueError(f"unknown config variant {variant!r}; choose from "
                       + ", ".join(f"{k} ({v})" for k, v in VARIANTS.items()))
  return cfg


def _unknown(cfg: ConfigDict, schema: ConfigDict, prefix: str = "") -> list[str]:
  problems = []
  for key, value in cfg.items():
    name = prefix + key
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      problems.append(name + (f" (did you mean {prefix + close[0]}?)" if close else ""))
    elif name in _CONSTRUCTOR_OPTIONS:
      options = ConfigDict(dict.fromkeys(_constructor_options(name)))
      problems += _unknown(value, options, name + ".")
    elif isinstance(value, ConfigDict) and name not in _FREE_FORM:
      problems += _unknown(value, schema[key], name + ".")
  return problems


# mmdet configuration dicts, checked by create_detector when the model is built.
_FREE_FORM = {"model.neck", "model.rpn_head", "model.roi_head", "model.test_cfg",
              "model.train_cfg"}

# Config keys that hold constructor options: (class, options the trainer sets itself).
_CONSTRUCTOR_OPTIONS = {
    "model.overrides": ("InternImage", {"num_classes", "rngs", "dtype", "activation_sharding",
                                        "axis_rules", "remat", "implementation"}),
    "model.decode_head": ("UperHead", {"in_channels", "num_classes", "rngs"}),
    "model.auxiliary_head": ("FCNHead", {"in_channels", "num_classes", "rngs"}),
}


def _constructor_options(key: str) -> list[str]:
  """What ``key`` (``_CONSTRUCTOR_OPTIONS``) may set: its class's constructor options,
  less those the trainer sets from other keys."""
  from internimage_jax import models

  cls_name, set_by_trainer = _CONSTRUCTOR_OPTIONS[key]
  return [p for p in inspect.signature(getattr(models, cls_name).__init__).parameters
          if p not in set_by_trainer | {"self"}]


def axis_rules(cfg: ConfigDict) -> dict[str, str | None]:
  """``config.axis_rules`` as the model takes it ("None" from the command line is None)."""
  return {name: None if axis in (None, "None") else axis
          for name, axis in cfg.axis_rules.to_dict().items()}


def validate(cfg: ConfigDict) -> None:
  """Raises ``ValueError`` naming every key the schema does not know and bad values."""
  unknown = _unknown(cfg, base_config())
  if unknown:
    raise ValueError("unknown config key(s): " + ", ".join(unknown))
  from internimage_jax.training.tasks import task_class

  task_class(cfg)  # raises for an unknown task
  if cfg.train.schedule not in ("cosine", "poly", "step"):
    raise ValueError(f"config.train.schedule must be 'cosine', 'poly' or 'step', got "
                     f"{cfg.train.schedule!r}")
  if cfg.eval.mode not in ("whole", "slide"):
    raise ValueError(f"config.eval.mode must be 'whole' or 'slide', got {cfg.eval.mode!r}")
  for key in ("crop", "stride", "img_scale", "canvas", "label_canvas"):
    value = tuple(cfg.eval[key])
    if len(value) != 2 or not all(isinstance(v, int) and v > 0 for v in value):
      raise ValueError(f"config.eval.{key} must be two positive integers, got {value}")
  if not cfg.eval.scales or not all(s > 0 for s in cfg.eval.scales):
    raise ValueError(f"config.eval.scales must be positive ratios, got {tuple(cfg.eval.scales)}")
  if cfg.eval_every_steps < -1:
    raise ValueError(f"config.eval_every_steps must be -1 (never), 0 (once per epoch) or "
                     f"positive, got {cfg.eval_every_steps}")
  if cfg.train.decay_rate <= 0:
    raise ValueError(f"config.train.decay_rate must be positive, got {cfg.train.decay_rate}")
  if cfg.mode not in ("train", "eval"):
    raise ValueError(f"config.mode must be 'train' or 'eval', got {cfg.mode!r}")
  if cfg.model.remat not in ("none", "block", "dots"):
    raise ValueError(f"config.model.remat must be 'none', 'block' or 'dots', got "
                     f"{cfg.model.remat!r}")
  for name, axis in axis_rules(cfg).items():
    if axis not in (None, "data", "fsdp", "model"):
      raise ValueError(f"config.axis_rules.{name} must be a mesh axis (data, fsdp, model) or "
                       f"None, got {axis!r}")
  if cfg.model.implementation not in IMPLEMENTATIONS:
    raise ValueError(f"config.model.implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{cfg.model.implementation!r}")
  if cfg.train.compute_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"config.train.compute_dtype must be 'float32' or 'bfloat16', got "
                     f"{cfg.train.compute_dtype!r}")
  if cfg.train.accum_steps < 1 or cfg.train.global_batch % cfg.train.accum_steps:
    raise ValueError(f"config.train.accum_steps ({cfg.train.accum_steps}) must be >= 1 and "
                     f"divide the global batch ({cfg.train.global_batch})")
