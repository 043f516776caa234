"""What a kind of training adds to the common loop (``trainer.py``): its data, model,
on-device augmentation and loss, and evaluation counts. ``config.task`` chooses one of
``TASKS``; the loop, sharding, checkpoints and metrics are the same for all.

Evaluation is a sum of integer counts (hits, or per-class pixel areas) over batches,
devices and processes, turned into metrics once the whole split has been seen, so the
metrics are exact whatever the batch size or the mesh.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from internimage_jax import models
from internimage_jax.training import augment, batch_augment, optim, pipeline, sources
from internimage_jax.training.errors import TrainingError


class Task:
  """The task-specific parts of training; ``num_classes``, ``mean``, ``std`` and
  ``class_names`` come from the data source (``make_source``)."""

  name: str
  primary_metric: str  # the evaluation metric the run reports its best of (higher: better)

  def __init__(self, cfg: ConfigDict, num_classes: int, mean=augment.IMAGENET_MEAN,
               std=augment.IMAGENET_STD, class_names: list[str] | None = None):
    self.cfg, self.num_classes = cfg, num_classes
    self.mean, self.std = tuple(mean), tuple(std)
    self.class_names = list(class_names or [str(i) for i in range(num_classes)])

  @staticmethod
  def make_source(cfg: ConfigDict, split: str) -> Any:
    """The ``split`` ("train" or "eval") source of ``config.data``."""
    raise NotImplementedError

  def bind_eval_source(self, source: Any) -> None:
    """Takes what evaluation needs from the evaluation source beyond its examples (the
    ground truth of a COCO evaluation); nothing by default."""

  # ------------------------------------------------------------------ host
  def train_example(self) -> pipeline.Example:
    raise NotImplementedError

  def eval_example(self) -> pipeline.Example:
    raise NotImplementedError

  # ---------------------------------------------------------------- device
  def model_options(self) -> dict[str, Any]:
    """The config's options of the model (``create``'s ``options``); saved with the run
    (``model.json``) so that its checkpoints can be read without the config."""
    raise NotImplementedError

  @staticmethod
  def create(name: str, num_classes: int, options: dict[str, Any], **runtime) -> nnx.Module:
    """The model ``name`` with ``options`` and the trainer's ``runtime`` options (rngs,
    dtype, sharding, remat, kernels)."""
    raise NotImplementedError

  def build_model(self, **runtime) -> nnx.Module:
    """The run's model, with the trainer's ``runtime`` options."""
    return self.create(self.cfg.model.name, self.num_classes, self.model_options(), **runtime)

  def batch_shapes(self, batch: int, train: bool) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``name -> (shape, dtype)`` of a global batch as the pipeline delivers it."""
    raise NotImplementedError

  def prepare(self, key: jax.Array, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """On-device augmentation of a training batch (outside the gradient)."""
    raise NotImplementedError

  def loss(self, model: nnx.Module, prepared: dict[str, jax.Array]) -> jax.Array:
    raise NotImplementedError

  def eval_counts(self, model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """What one evaluation batch gives (``batch["valid"]`` masks padding): integer counts,
    or what the task's ``accumulate`` keeps (detection: the detections)."""
    raise NotImplementedError

  def accumulate(self, totals: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
    """Adds one evaluation batch's outputs (on the host) to ``totals``: counts are summed
    exactly, in int64 (a task whose outputs are not counts keeps them its own way)."""
    for k, v in outputs.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.int64)

  def metrics(self, totals: dict[str, np.ndarray], count: int, prefix: str) -> dict[str, float]:
    """The ``prefix/...`` metrics of the accumulated outputs over ``count`` images."""
    raise NotImplementedError

  def report(self, totals: dict[str, np.ndarray], prefix: str) -> list[str]:
    """Extra lines for the end-of-run summary (e.g. per-class scores)."""
    return []

  def layer_decay_ratios(self, model: nnx.Module) -> dict[str, float]:
    """Official-name prefix -> LR ratio of ``config.train.layer_decay``."""
    raise NotImplementedError

  def init_path(self, init_from: str) -> str:
    """The local file of ``config.init_from``: a path, or a published tag of the model's
    backbone (``in1k``, ``in22k``, ``ade20k``, ``coco_1x``, ...: downloaded once,
    ``internimage_jax.pretrained``); a tag of another task's system is refused."""
    from internimage_jax import pretrained

    backbone = self.cfg.model.name.removeprefix("upernet_").removeprefix("mask_rcnn_")
    entry = pretrained.entry_of(init_from, backbone)
    own = {"segmentation": "segmentor", "detection": "detector"}.get(self.name, "classifier")
    if entry is not None and entry.holds not in ("classifier", own):
      raise TrainingError(f"config.init_from {init_from!r} is a {entry.holds}'s checkpoint; "
                          f"a {self.name} run starts from a classification tag (in1k, "
                          "in22k, ...)" + ("" if own == "classifier" else f" or a {own}'s"))
    try:
      path, _ = pretrained.resolve(init_from, backbone)
    except (OSError, ValueError) as e:
      raise init_from_error(e) from e
    return str(path)

  def load_init(self, model: nnx.Module, path: str) -> list[str]:
    """Loads ``config.init_from`` into ``model`` in place; returns what to tell the user.
    Raises ``TrainingError`` when the file cannot be read or does not fit."""
    raise NotImplementedError

  def lr_multipliers(self, model: nnx.Module):
    train = self.cfg.train
    decay = train.layer_decay not in (0.0, 1.0)  # 1.0: every ratio is 1 (the T/S/B recipes)
    ratios = self.layer_decay_ratios(model) if decay else {}
    return optim.lr_multipliers(model, ratios, train.dcn_lr_mul)


class Classification(Task):
  """Image classification: the original ImageNet recipe (mixup / cutmix, random erasing,
  label smoothing), top-1 and top-5 accuracy."""

  name = "classification"
  primary_metric = "eval/top1"

  @staticmethod
  def make_source(cfg: ConfigDict, split: str) -> Any:
    return sources.make_source(cfg.data, split)

  def train_example(self) -> pipeline.Example:
    size, aug = self.cfg.data.image_size, self.cfg.aug
    return pipeline.Classify(augment.TrainTransform(
        size=size, scale=tuple(aug.scale), ratio=tuple(aug.ratio), hflip=aug.hflip,
        randaugment=aug.randaugment, random_resized_crop=aug.random_resized_crop), size)

  def eval_example(self) -> pipeline.Example:
    size = self.cfg.data.image_size
    return pipeline.Classify(augment.EvalTransform(size=size), size)

  def model_options(self):
    return self.cfg.model.overrides.to_dict()

  @staticmethod
  def create(name, num_classes, options, **runtime):
    return models.create(name, num_classes=num_classes, **runtime, **options)

  def batch_shapes(self, batch: int, train: bool):
    size = self.cfg.data.image_size
    return {"image": ((batch, size, size, 3), jnp.uint8), "label": ((batch,), jnp.int32)}

  def prepare(self, key, batch):
    """Normalise, random erasing, mixup / cutmix -> images and soft targets."""
    aug, train = self.cfg.aug, self.cfg.train
    erase_key, mix_key = jax.random.split(key)
    x = batch_augment.normalize(batch["image"], self.mean, self.std)
    if aug.reprob:
      x = batch_augment.random_erasing(erase_key, x, aug.reprob)
    x, targets = batch_augment.mixup_cutmix(
        mix_key, x, batch["label"], self.num_classes, mixup_alpha=aug.mixup,
        cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.mixup_switch_prob,
        label_smoothing=train.label_smoothing)
    return {"x": x, "targets": targets}

  def loss(self, model, prepared):
    logits = model(prepared["x"]).astype(jnp.float32)
    return optax.softmax_cross_entropy(logits, prepared["targets"]).mean()

  def eval_counts(self, model, batch):
    x = batch_augment.normalize(batch["image"], self.mean, self.std)
    labels, valid = batch["label"], batch["valid"]
    logits = model(x).astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    return {"top1": jnp.sum((top5[:, 0] == labels) & valid),
            "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) & valid)}

  def metrics(self, totals, count, prefix):
    return {f"{prefix}/{k}": float(v) / count for k, v in totals.items()}

  def layer_decay_ratios(self, model):
    return optim.layer_decay_ratios(model.depths, self.cfg.train.layer_decay)

  def load_init(self, model, path):
    """Everything must fit but the head, which keeps its fresh initialisation when the
    checkpoint has another class count (fine-tuning)."""
    report = load_weights(model, path)
    problems = [k for k in report.missing + report.unexpected
                + [m.split(":")[0] for m in report.mismatched] if not k.startswith("head.")]
    if problems:
      raise TrainingError(f"config.init_from {path} does not fit the model: "
                          + ", ".join(sorted(problems)[:20]))
    return [f"init_from: head re-initialised ({', '.join(report.mismatched)})"
            ] if report.mismatched else []


def load_weights(module: nnx.Module, path: str, state_dict=None):
  """``convert``'s non-strict load of ``path`` (or of its already read ``state_dict``)
  into ``module``, with read errors as ``TrainingError``; returns the load report."""
  from internimage_jax import convert

  try:
    if state_dict is not None:
      return convert.load_state_dict(module, state_dict, strict=False)
    return convert.load_checkpoint(module, path, strict=False)
  except (OSError, ValueError) as e:
    raise init_from_error(e) from e


def load_system_init(model: nnx.Module, path: str, parts: tuple[str, ...],
                     resized: tuple[str, ...], kind: str) -> list[str]:
  """``config.init_from`` for a system built on the backbone (a segmentor, a detector):
  a checkpoint of the same kind (keys under ``parts``) loads whole, except that the
  class-count dependent layers (names containing one of ``resized``) keep their
  initialisation when their shapes differ; any other file is a classification checkpoint
  that initialises the backbone, as the original's ``init_cfg``: its classifier is not
  used and the backbone's task-only parameters (T's layer scale) keep their
  initialisation, both reported. Raises ``TrainingError`` when the file does not fit."""
  from pathlib import Path

  from internimage_jax import convert

  if Path(path).is_dir() and convert.train_run_step(path) is None:
    # a converted (orbax) directory of this very model
    load_weights(model, path)
    return []
  try:
    state_dict = convert.read_state_dict(path)
  except (OSError, ValueError) as e:
    raise init_from_error(e) from e
  if any(k.startswith(parts) for k in state_dict):
    report = load_weights(model, path, state_dict)
    problems = report.missing + report.unexpected + [
        m for m in report.mismatched if not any(r in m.split(":")[0] for r in resized)]
    if problems:
      raise TrainingError(f"config.init_from {path} does not fit the {kind}: "
                          + ", ".join(sorted(problems)[:20]))
    return [f"init_from: class-count dependent layers re-initialised "
            f"({', '.join(report.mismatched)})"] if report.mismatched else []
  report = load_weights(model.backbone, path, state_dict)
  if report.mismatched:
    raise TrainingError(f"config.init_from {path} does not fit the backbone: "
                        + ", ".join(report.mismatched[:20]))
  loaded = len(convert.state_dict_keys(model.backbone)) - len(report.missing)
  if loaded == 0:
    raise TrainingError(f"config.init_from {path} holds no weight of the backbone")
  lines = [f"init_from: backbone initialised from {path} ({loaded} entries)"]
  if report.missing:
    lines.append(f"  kept at their initialisation ({len(report.missing)}): "
                 + _listed(report.missing))
  if report.unexpected:
    lines.append(f"  in the file, not used ({len(report.unexpected)}): "
                 + _listed(report.unexpected))
  return lines


def _listed(keys: list[str], shown: int = 8) -> str:
  return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown
                                    else "")


def init_from_error(e: Exception) -> TrainingError:
  """A ``config.init_from`` read error as the one line a user sees."""
  hint = ("; --config.init_from='' starts from random weights"
          if isinstance(e, FileNotFoundError) else "")
  return TrainingError(f"config.init_from: {e}{hint}")


def _segmentation() -> type[Task]:
  from internimage_jax.training.segmentation.task import Segmentation

  return Segmentation


def _detection() -> type[Task]:
  from internimage_jax.training.detection.task import Detection

  return Detection


TASKS = {"classification": lambda: Classification, "segmentation": _segmentation,
         "detection": _detection}


def task_class(cfg: ConfigDict) -> type[Task]:
  """The ``Task`` class of ``config.task``."""
  if cfg.task not in TASKS:
    raise ValueError(f"config.task must be one of {sorted(TASKS)}, got {cfg.task!r}")
  return TASKS[cfg.task]()
