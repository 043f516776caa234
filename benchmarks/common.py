"""Shared benchmark helpers: timing, peak-memory sampling, machine description."""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable

# glibc otherwise raises its mmap threshold after large frees and keeps freed blocks
# in the heap, so RSS would not fall back; a fixed threshold makes every large buffer
# an mmap that is returned on free, and RSS then tracks live memory. Set before the
# allocators start: benchmark workers are started with this environment.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


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


def train_config(model: str, image_size: int, global_batch: int, mesh: str, remat: str,
                 compute_dtype: str, accum_steps: int = 1, ema: bool = True,
                 options: dict | None = None):
  """The config of ``train.py`` for a model and step shape (no data, nothing built)."""
  from internimage_jax.training.config import base_config

  cfg = base_config()
  cfg.model.name = model
  cfg.model.remat = remat
  cfg.model.overrides.update(options or {})
  cfg.data.image_size = image_size
  cfg.train.update(global_batch=global_batch, accum_steps=accum_steps,
                   compute_dtype=compute_dtype, ema_decay=0.9999 if ema else 0.0)
  cfg.mesh = type(cfg.mesh)({k: int(v) for k, v in
                             (item.split("=") for item in mesh.split(","))})
  return cfg


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
