"""Shared benchmark helpers: timing, peak-memory sampling, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

# glibc otherwise raises its mmap threshold after large frees and keeps freed blocks
# in the heap, so RSS would not fall back; a fixed threshold makes every large buffer
# an mmap that is returned on free, and RSS then tracks live memory. Set before the
# allocators start: benchmark workers are started with this environment.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def rss_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
  """Samples RSS at ~2 kHz in a thread; ``peak_growth`` is max RSS minus RSS at start."""

  def __init__(self, interval_s: float = 0.0005):
    self.interval_s = interval_s
    self.peak_growth = 0

  def __enter__(self) -> "PeakRSS":
    self._start = rss_bytes()
    self._peak = self._start
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def _run(self) -> None:
    while not self._stop.is_set():
      self._peak = max(self._peak, rss_bytes())
      time.sleep(self.interval_s)

  def __exit__(self, *exc) -> None:
    self._peak = max(self._peak, rss_bytes())
    self._stop.set()
    self._thread.join()
    self.peak_growth = self._peak - self._start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# Classes of the synthetic batches: ImageNet-1K, ADE20K for the UperNet recipes and
# COCO for the Mask R-CNN ones.
NUM_CLASSES = {"classification": 1000, "segmentation": 150, "detection": 80}
SEGMENTOR_PREFIX = "upernet_internimage_"
DETECTOR_PREFIX = "mask_rcnn_internimage_"
# ``--options`` entries that configure a segmentor's heads / a detector's parts
# (dicts merged into ``cfg.model.<name>``), not the backbone.
SEGMENTOR_OPTIONS = ("decode_head", "auxiliary_head")
DETECTOR_OPTIONS = ("neck", "rpn_head", "roi_head", "test_cfg", "train_cfg")


def segmentation_recipe(model: str):
  """The ADE20K recipe of ``model`` (``upernet_internimage_<size>``): ``get_config()``
  of ``configs/upernet_internimage_<size>_*_ade20k.py``, the one home of each size's lr,
  layer decay and gradient clipping."""
  import importlib.util

  found = sorted(CONFIGS.glob(f"{model}_*_ade20k.py"))
  if len(found) != 1:
    raise SystemExit(f"{model}: expected one configs/{model}_*_ade20k.py, found "
                     f"{[p.name for p in found]}")
  spec = importlib.util.spec_from_file_location(found[0].stem, found[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def train_config(model: str, image_size: int, global_batch: int, mesh: str, remat: str,
                 compute_dtype: str, accum_steps: int = 1, ema: bool | None = None,
                 options: dict | None = None):
  """The config of ``train.py`` for a model and step shape (no data, nothing built):
  ``internimage_*`` the ImageNet recipe, ``upernet_internimage_*`` the ADE20K one
  (``segmentation_recipe``) with crop ``image_size``, ``mask_rcnn_internimage_*`` the
  COCO 1x one (``mask_rcnn_coco``) with canvas ``image_size``. ``ema`` None: the
  recipe's (on for ImageNet, off for ADE20K and COCO); ``options`` override the
  backbone's constructor options, and for a segmentor its entries ``decode_head`` /
  ``auxiliary_head``, for a detector ``neck`` / ``rpn_head`` / ``roi_head`` /
  ``test_cfg`` / ``train_cfg`` (dicts, merged into ``cfg.model.<entry>``) the other
  parts' (small tests)."""
  from internimage_jax.training.config import base_config, mask_rcnn_coco

  if model.startswith(SEGMENTOR_PREFIX):
    cfg = segmentation_recipe(model)
  elif model.startswith(DETECTOR_PREFIX):
    cfg = mask_rcnn_coco(base_config(), model[len(DETECTOR_PREFIX):], "1x")
  else:
    cfg = base_config()
    cfg.model.name = model
  cfg.model.remat = remat
  options = dict(options or {})
  for task, parts in (("segmentation", SEGMENTOR_OPTIONS), ("detection", DETECTOR_OPTIONS)):
    for part in parts:
      if part in options:
        if cfg.task != task:
          raise SystemExit(f"--options {part}: only a {task} model has one")
        cfg.model[part].update(options.pop(part))
  cfg.model.overrides.update(options)
  # The crop of a segmentation recipe, the canvas of a detection one: the train step's
  # batch shape. The host-side resize and evaluation sizes (config.aug, config.eval)
  # keep the recipe's values: no step measured here reads them.
  cfg.data.image_size = image_size
  cfg.train.update(global_batch=global_batch, accum_steps=accum_steps,
                   compute_dtype=compute_dtype)
  if ema is not None:
    cfg.train.ema_decay = 0.9999 if ema else 0.0
  cfg.mesh = type(cfg.mesh)({k: int(v) for k, v in
                             (item.split("=") for item in mesh.split(","))})
  return cfg


def synthetic_batch(program, batch: int, seed: int = 0) -> dict:
  """A global training batch of ``program.task.batch_shapes``, made on the devices in
  the program's batch sharding: random uint8 images, labels random in
  ``[0, num_classes)``, valid sizes the full image. Detection entries: in each image
  ``min(max_instances, 8)`` random boxes (x1, y1, x2, y2 pixels; sides 1/8 to 1/2 of the
  canvas, at least 1/16 of it from its edges), ``masks`` the filled boxes (packed along
  the width, as ``np.packbits``), ``labels`` random, ``num`` that count; the other slots
  zero."""
  import jax
  import jax.numpy as jnp

  shapes = program.task.batch_shapes(batch, train=True)
  canvas = shapes["image"][0][1]
  if "boxes" in shapes:
    slots = shapes["boxes"][0][1]
    objects = min(slots, 8)

  def make(key):
    out = {}
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    if "boxes" in shapes:
      side_key, corner_key = jax.random.split(keys["boxes"])
      side = jax.random.uniform(side_key, (batch, slots, 2), minval=canvas / 8,
                                maxval=canvas / 2)
      margin = canvas / 16
      corner = margin + jax.random.uniform(corner_key, (batch, slots, 2)) * (
          canvas - 2 * margin - side)
      real = (jnp.arange(slots) < objects)[None, :, None]
      boxes = jnp.where(real, jnp.concatenate([corner, corner + side], -1), 0.0)
    for name, (shape, dtype) in shapes.items():
      k = keys[name]
      if name == "image":
        value = jax.random.randint(k, shape, 0, 256)
      elif name in ("label", "labels"):
        value = jax.random.randint(k, shape, 0, program.num_classes)
        if name == "labels":
          value = jnp.where(jnp.arange(slots) < objects, value, 0)
      elif name == "size":  # (h, w) of the valid region: the whole image
        value = jnp.broadcast_to(jnp.array(shapes["image"][0][1:3]), shape)
      elif name == "boxes":
        value = boxes
      elif name == "num":
        value = jnp.full(shape, objects)
      elif name == "masks":  # the filled boxes: pixel centres inside, packed along x
        centre = jnp.arange(canvas) + 0.5
        rows = ((centre >= boxes[..., 1, None]) & (centre < boxes[..., 3, None]))
        cols = ((centre >= boxes[..., 0, None]) & (centre < boxes[..., 2, None]))
        value = jnp.packbits(rows[..., :, None] & cols[..., None, :], axis=-1)
      else:
        raise ValueError(f"synthetic_batch: no rule for batch entry {name!r}")
      out[name] = value.astype(dtype)
    return out

  return jax.jit(make, out_shardings=program.batch_sharding)(jax.random.key(seed))


def tree_bytes(tree, per_device: bool = False) -> int:
  """Bytes of an (abstract) array tree: whole, or one device's shards."""
  import jax
  import numpy as np

  def size(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
    return int(np.prod(shape)) * x.dtype.itemsize

  return sum(size(x) for x in jax.tree.leaves(tree))


def memory_report(compiled) -> dict[str, int]:
  """Per-device bytes of a compiled program by XLA's memory analysis ({} if none)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return {}
  return dict(
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      # Donated state is both argument and output: count it once.
      total_bytes=(memory.argument_size_in_bytes + memory.output_size_in_bytes
                   - memory.alias_size_in_bytes + memory.temp_size_in_bytes))


def machine() -> dict[str, object]:
  import jax

  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {
      "cpu": cpu,
      "cores": os.cpu_count(),
      "jax": jax.__version__,
      "backend": jax.default_backend(),
      "devices": [d.device_kind for d in jax.devices()],
  }
