"""The train step of ``train.py`` on the real devices: the largest per-device batch that
fits, its step time and peak memory.

    python benchmarks/train_step.py --model internimage_h --image-size 640 \\
        --remat block --compute-dtype bfloat16 --start-batch 32 --budget 480

Builds the training program (augmentation, forward, backward, clipped AdamW with LR
groups, EMA) for the local devices and initialises its sharded state. Then:

1. searches for the largest per-device batch whose step fits the device's memory limit
   by XLA's memory analysis, to within ``--resolution`` images, compiling without the
   GPU autotuner (which timed kernels throughout the one H compile measured on an
   H100): from ``--start-batch``, each next batch where the line through the nearest
   measured batches meets the limit, while more than ``--run-share`` of ``--budget``
   is left;
2. runs and times the executable the search compiled for that batch (a real
   allocation proves it fits), stepping down on an out-of-memory error;
3. on a GPU, if the time left allows, compiles that batch again with the autotuner
   and times it too (``"autotuned": true``).

Prints a JSON line per batch compiled (compile seconds, memory analysis; for a run:
median step seconds over ``--steps`` timed calls, images/s, the allocator's peak
bytes) and, after every run, a summary line (the last line is the summary; a run cut
short by a timeout still leaves the summary of what ran). Synthetic uint8 images (the
step's augmentation normalises them; ``benchmarks.common.synthetic_batch``). On a CPU
(no allocator statistics) the limit is ``--limit-gib``. An ``upernet_internimage_*`` model
is the ADE20K recipe of its size (150 classes, crop ``--image-size``, no EMA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The default (75% of the card) would hide a quarter of it from the largest batch.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from benchmarks.common import (NUM_CLASSES, machine, median_seconds, memory_report,  # noqa: E402
                               synthetic_batch, train_config, tree_bytes)
from internimage_jax.training import sharding  # noqa: E402
from internimage_jax.training.trainer import TrainProgram  # noqa: E402

# Of the allocator's limit: room for the allocator's fragmentation and the inputs.
SAFETY = 0.97


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="internimage_h")
  parser.add_argument("--image-size", type=int, default=640)
  parser.add_argument("--mesh", default="data=-1,fsdp=1", help="axis=size,... (-1: the rest)")
  parser.add_argument("--remat", default="block", choices=["none", "block", "dots"])
  parser.add_argument("--compute-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--options", default="{}", help="JSON overrides of the variant")
  parser.add_argument("--start-batch", type=int, default=16, help="images per device")
  parser.add_argument("--max-batch", type=int, default=1024, help="per device, at most")
  parser.add_argument("--resolution", type=int, default=4,
                      help="images per device to which the largest batch is searched")
  parser.add_argument("--run-share", type=float, default=0.5,
                      help="share of --budget kept for compiling and running the batch found")
  parser.add_argument("--steps", type=int, default=3, help="timed steps per batch")
  parser.add_argument("--budget", type=float, default=480, help="seconds for all of it")
  parser.add_argument("--limit-gib", type=float, default=None,
                      help="memory limit per device when the device reports none")
  return parser.parse_args()


class Bench:
  """One program and state, stepped at several batch sizes."""

  def __init__(self, args: argparse.Namespace):
    self.args = args
    self.devices = jax.device_count()
    cfg = train_config(args.model, args.image_size, args.start_batch * self.devices,
                       args.mesh, args.remat, args.compute_dtype,
                       options=json.loads(args.options))
    start = time.perf_counter()
    self.program = TrainProgram(cfg, num_classes=NUM_CLASSES[cfg.task], steps_per_epoch=1000)
    self.ways = sharding.batch_size_of(self.program.mesh)
    self.state_bytes = tree_bytes(self.program.abstract_state, per_device=True)
    self.grad_bytes = tree_bytes(self.program.abstract_state["params"], per_device=True)
    self.state, self.rng_state = jax.block_until_ready(self.program.init())
    self.init_s = time.perf_counter() - start
    self.kept: dict[int, object] = {}  # batch -> the search's executable (the largest fit)
    self.compile_s: list[float] = []  # of the search's compiles
    stats = jax.local_devices()[0].memory_stats() or {}
    self.limit = stats.get("bytes_limit") or (
        int(args.limit_gib * 2**30) if args.limit_gib else None)
    if self.limit is None:
      raise SystemExit("the device reports no memory limit: pass --limit-gib")

  def per_device(self, batch: int) -> int:
    """``batch`` rounded down to what the mesh's data-parallel split allows."""
    total = max(batch * self.devices // self.ways, 1) * self.ways
    return total // self.devices

  def compile(self, batch: int, tuned: bool = False):
    """The step compiled for ``batch`` per device, with its compile seconds and memory
    analysis. Without ``tuned``, a GPU compiles without its autotuner: the search needs
    the memory analysis, not the fastest kernels, and the executable still runs, with
    XLA's default kernel choices."""
    options = None if tuned or jax.default_backend() != "gpu" else {"xla_gpu_autotune_level": 0}
    start = time.perf_counter()
    compiled = self.program.train_step.lower(
        *self.program.abstract_inputs(batch * self.devices)).compile(options)
    return compiled, time.perf_counter() - start, memory_report(compiled)

  def analyse(self, batch: int) -> dict:
    """Compile (untuned) and say whether ``batch`` fits by XLA's memory analysis; the
    executable of the largest batch that fits is kept for the run."""
    compiled, seconds, report = self.compile(batch)
    self.compile_s.append(seconds)
    row = {"batch_per_device": batch, "analysis_compile_s": round(seconds, 1), **report,
           "fits": self.fits(report)}
    if row["fits"] and batch > max(self.kept, default=0):
      self.kept = {batch: compiled}  # one at a time: an H executable holds host memory
    return row

  def run(self, compiled, batch: int) -> tuple[float, float]:
    """Median seconds of a step at ``batch`` per device, and the first step's loss."""
    inputs = synthetic_batch(self.program, batch * self.devices, seed=batch)
    losses = []

    def step():
      self.state, metrics = compiled(self.state, self.rng_state, inputs)
      losses.append(metrics["loss"])
      jax.block_until_ready(metrics)

    seconds = median_seconds(step, self.args.steps, warmup=1)
    return seconds, float(losses[0])

  def recover(self) -> None:
    """A failed step may have consumed the donated state: initialise a new one."""
    if any(x.is_deleted() for x in jax.tree.leaves(self.state)):
      self.state, self.rng_state = jax.block_until_ready(self.program.init())

  def peak(self) -> int | None:
    return (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")

  def fits(self, report: dict) -> bool:
    return report.get("total_bytes", 0) <= SAFETY * self.limit

  def attempt(self, batch: int, tuned: bool = False) -> dict:
    """Run one batch: the search's executable where it kept one, else compile it."""
    if not tuned and batch in self.kept:
      compiled, row = self.kept.pop(batch), {"batch_per_device": batch, "compiled_by": "search"}
      row.update(memory_report(compiled))
    else:
      compiled, compile_s, report = self.compile(batch, tuned)
      row = {"batch_per_device": batch, "compile_s": round(compile_s, 1), **report}
      if not self.fits(report):
        return {**row, "error": f"memory analysis {report['total_bytes'] / 2**30:.1f} GiB "
                               "over the limit"}
    row["autotuned"] = tuned and jax.default_backend() == "gpu"
    try:
      seconds, loss = self.run(compiled, batch)
    except Exception as e:  # noqa: BLE001 (the allocator's error type differs by version)
      self.recover()
      return {**row, "error": f"{type(e).__name__}: {str(e)[:400]}"}
    return {**row, "step_s": seconds, "images_per_s": batch * self.devices / seconds,
            "first_loss": loss, "peak_bytes_in_use": self.peak()}


def search(bench: Bench, args: argparse.Namespace, until: Callable[[], bool],
           record: Callable[[dict], dict]) -> tuple[int, int | None]:
  """The largest per-device batch whose compiled step fits by XLA's memory analysis,
  to within ``--resolution`` images: compile-only steps (no autotuning on a GPU),
  each next batch where the line through the nearest measured batches meets the limit.
  Returns (largest that fits, smallest that does not or None)."""
  target = SAFETY * bench.limit
  fit, over = 0, None
  points: dict[int, int] = {}
  batch = bench.per_device(min(args.start_batch, args.max_batch))
  while True:
    row = record(bench.analyse(batch))
    points[batch] = row["total_bytes"]
    if row["fits"]:
      fit = max(fit, batch)
    else:
      over = batch if over is None else min(over, batch)
    step = bench.per_device(args.resolution) or 1
    if (over is not None and over - fit <= step) or (fit >= args.max_batch) or until():
      return fit, over
    # Where the line through the two nearest batches meets the limit; with one
    # point, the state and gradients are fixed and the rest grows with the batch.
    near = sorted(points, key=lambda b: abs(b - batch))[:2]
    if len(near) == 2 and near[0] != near[1]:
      (b0, t0), (b1, t1) = ((b, points[b]) for b in near)
      per_image = max((t1 - t0) / (b1 - b0), 1.0)
      guess = b0 + (target - t0) / per_image
    else:
      fixed = bench.state_bytes + bench.grad_bytes
      guess = batch * (target - fixed) / max(points[batch] - fixed, 1)
    low, high = fit + step, (over - step if over is not None else args.max_batch)
    guess = int(min(max(guess, low), high))
    if over is not None and not low <= guess <= high:
      guess = (fit + over) // 2
    batch = bench.per_device(guess)
    if batch in points:  # rounding met a batch already measured: halve the interval
      batch = bench.per_device((fit + (over if over is not None else 2 * fit)) // 2)
      if batch in points:
        return fit, over


def main() -> None:
  args = _parse()
  clock = time.perf_counter()
  left = lambda: args.budget - (time.perf_counter() - clock)
  bench = Bench(args)
  summary = {"model": args.model, "image_size": args.image_size, "remat": args.remat,
             "compute_dtype": args.compute_dtype, "mesh": dict(bench.program.mesh.shape),
             "devices": bench.devices, "state_bytes_per_device": bench.state_bytes,
             "bytes_limit": bench.limit, "init_s": round(bench.init_s, 1),
             "machine": machine(), "rows": []}

  def record(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    summary["rows"].append(row)
    if "step_s" in row:
      best = summary.get("largest")
      # The later of equal batches: the autotuned run follows the untuned one.
      if best is None or row["batch_per_device"] >= best["batch_per_device"]:
        summary["largest"] = row
    return row

  # Search by compiling only, while more than --run-share of the budget is left.
  fit, over = search(bench, args, lambda: left() < args.run_share * args.budget, record)
  summary["largest_by_analysis"], summary["smallest_over_by_analysis"] = fit, over

  def report() -> None:
    summary["seconds"] = round(time.perf_counter() - clock, 1)
    print(json.dumps(summary), flush=True)

  # Run the search's executable of the largest batch; step down on an out-of-memory error.
  batch = fit
  while batch >= 1 and left() > 0:
    row = record(bench.attempt(batch))
    if "error" not in row:
      break
    batch = bench.per_device(batch - max(args.resolution, batch // 20))
  report()
  # On a GPU, the same batch with the autotuner's kernels, if a compile fits in the time
  # left: judged by the slowest search compile, with the autotuner's share unknown.
  largest = summary.get("largest")
  if (largest and jax.default_backend() == "gpu"
      and left() > 2 * max(bench.compile_s) + 4 * largest["step_s"] * (args.steps + 1)):
    record(bench.attempt(largest["batch_per_device"], tuned=True))
    report()


if __name__ == "__main__":
  main()
