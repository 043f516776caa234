"""Segmentation against classification on the local devices: the UperNet train step and
whole-image inference against InternImage's, in images per second.

    python benchmarks/segmentation.py --model-size t --image-size 512 --per-device-batch 2 \\
        --steps 5

In one run, at the same image size and batch (``--per-device-batch`` times the local
devices, mesh ``data=-1``), median seconds of ``--steps`` timed calls after one warm-up:

1. the train step of ``train.py`` (``benchmarks.common.train_config``, EMA off for
   both): the ADE20K recipe of ``upernet_internimage_<size>`` (150 classes) against the
   ImageNet recipe of ``internimage_<size>`` (1000 classes), on synthetic batches;
2. inference in evaluation mode, jitted: the segmentor on whole images (``seg(images)``:
   logits at the input size) against its own backbone alone
   (``seg.backbone.forward_features``).

Prints one JSON line per measurement, then a summary line with the images/s ratios
(segmentation over classification, segmentor over backbone), the seconds until both
train steps were compiled (together, in the background), the machine and the
command. ``--options`` (JSON) overrides the backbone options of both models (and, in
entries ``decode_head`` / ``auxiliary_head``, the segmentor's heads): small models for
tests.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import (NUM_CLASSES, machine, median_seconds, synthetic_batch,  # noqa: E402
                               train_config)
from internimage_jax.training.trainer import TrainProgram  # noqa: E402

SEGMENTOR_ONLY = ("decode_head", "auxiliary_head")


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model-size", default="t", choices=["t", "s", "b", "l", "xl", "h"])
  parser.add_argument("--image-size", type=int, default=512)
  parser.add_argument("--per-device-batch", type=int, default=2)
  parser.add_argument("--steps", type=int, default=5, help="timed calls per measurement")
  parser.add_argument("--remat", default="none", choices=["none", "block", "dots"])
  parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--options", default="{}", help="JSON overrides of the variants")
  return parser.parse_args()


def _timed(fn, steps: int) -> float:
  return median_seconds(lambda: jax.block_until_ready(fn()), steps, warmup=1)


def train(program: TrainProgram, compiled, batch: int, steps: int):
  """Times the compiled train step of ``program``: its measurement row, and the state
  after the timed steps."""
  state, rng_state = program.init()
  inputs = synthetic_batch(program, batch)
  losses = []

  def call():
    nonlocal state
    state, metrics = compiled(state, rng_state, inputs)  # the state is donated: keep the new
    losses.append(metrics["loss"])
    return metrics

  seconds = _timed(call, steps)
  row = {"measurement": "train_step", "model": program.cfg.model.name,
         "task": program.cfg.task, "num_classes": program.num_classes, "step_s": seconds,
         "images_per_s": batch / seconds, "first_loss": float(losses[0])}
  return row, state, rng_state


def inference(program: TrainProgram, state, rng_state, batch: int, steps: int) -> list[dict]:
  """Whole-image inference of the segmentor of ``program``'s state and of its backbone
  alone, in evaluation mode, on normalised random images."""
  seg = program.merge(state, rng_state)
  seg.eval()
  graphdef, weights = nnx.split(seg)
  size = program.cfg.data.image_size
  images = jax.device_put(jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
                          program.batch_sharding)
  parts = {"segmentor": lambda m, x: m(x),
           "backbone": lambda m, x: m.backbone.forward_features(x)}
  with ThreadPoolExecutor(len(parts)) as pool:  # both compile at once (outside the GIL)
    compiled = dict(zip(parts, pool.map(
        lambda fn: jax.jit(lambda w, x: fn(nnx.merge(graphdef, w), x)).lower(
            weights, images).compile(), parts.values())))
  rows = []
  for name, fn in compiled.items():
    seconds = _timed(lambda: fn(weights, images), steps)
    rows.append({"measurement": "inference", "model": program.cfg.model.name, "part": name,
                 "call_s": seconds, "images_per_s": batch / seconds})
  return rows


def main() -> None:
  args = _parse()
  options = json.loads(args.options)
  batch = args.per_device_batch * jax.device_count()
  size = args.model_size
  programs = []
  for model, opts in ((f"internimage_{size}",
                       {k: v for k, v in options.items() if k not in SEGMENTOR_ONLY}),
                      (f"upernet_internimage_{size}", options)):
    cfg = train_config(model, args.image_size, batch, "data=-1,fsdp=1", args.remat,
                       args.compute_dtype, ema=False, options=opts)
    programs.append(TrainProgram(cfg, num_classes=NUM_CLASSES[cfg.task], steps_per_epoch=1000))
  # Every init and step compiles in the background, two at a time (XLA compiles outside
  # the GIL; on a CPU the compiles are most of a small run), all before anything is timed.
  start = time.perf_counter()
  inits = [p.init.compile_ahead() for p in programs]
  steps = [p.train_step.compile_ahead(*p.abstract_inputs(batch)) for p in programs]
  steps = [future.result() for future in steps]
  for future in inits:  # nothing compiles while anything is timed
    future.result()
  compile_s = time.perf_counter() - start
  rows = []

  def record(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    rows.append(row)
    return row

  cls = record(train(programs[0], steps[0], batch, args.steps)[0])
  seg, state, rng_state = train(programs[1], steps[1], batch, args.steps)
  record(seg)
  infer = {r["part"]: record(r) for r in inference(programs[1], state, rng_state, batch,
                                                   args.steps)}
  print(json.dumps({
      "summary": "segmentation vs classification, images/s", "image_size": args.image_size,
      "batch": batch, "remat": args.remat, "compute_dtype": args.compute_dtype,
      "options": options, "train_compile_s": round(compile_s, 1),
      "train_images_per_s": {"segmentation": seg["images_per_s"],
                             "classification": cls["images_per_s"]},
      "train_ratio_seg_over_cls": seg["images_per_s"] / cls["images_per_s"],
      "inference_images_per_s": {k: r["images_per_s"] for k, r in infer.items()},
      "inference_ratio_seg_over_backbone": (infer["segmentor"]["images_per_s"]
                                            / infer["backbone"]["images_per_s"]),
      "machine": machine(), "command": shlex.join(["python", *sys.argv]),
      "rows": rows}), flush=True)


if __name__ == "__main__":
  main()
