"""Detection against classification on the local devices: the Mask R-CNN train step and
inference against InternImage's, in images per second.

    python benchmarks/detection.py --model-size t --image-size 800 --per-device-batch 1 \\
        --steps 3

In one run, at the same image size (the detector's square canvas, a multiple of 32)
and batch (``--per-device-batch`` times the local devices, mesh ``data=-1``), median
seconds of ``--steps`` timed calls after one warm-up:

1. the train step of ``train.py`` (``benchmarks.common.train_config``, EMA off for
   both): the COCO 1x recipe of ``mask_rcnn_internimage_<size>`` (80 classes) against
   the ImageNet recipe of ``internimage_<size>`` (1000 classes), on synthetic batches
   (``benchmarks.common.synthetic_batch``: a few random boxes per image, their masks the
   filled boxes);
2. inference in evaluation mode, jitted: the detector on whole images (``det(images)``:
   boxes, scores, labels, masks pasted at the input size, num) against its own
   backbone alone (``det.backbone.forward_features``), on normalised random images.

Random weights give few or no detections above the score threshold (the detector's
row counts them), but every shape is static: the NMS loops run over all their
candidates (``fori_loop``, one step per candidate, whatever the scores), and the RoI
stages and the mask pasting over all their slots, so the per-image cost is the
trained model's.

Prints one JSON line per measurement, then a summary line with the images/s ratios
(detection over classification, detector over backbone), the seconds until both
train steps were compiled (together, in the background), the machine and the
command. ``--options`` (JSON) overrides the backbone options of both models (and, in
entries ``neck`` / ``rpn_head`` / ``roi_head`` / ``test_cfg`` / ``train_cfg``, the
detector's other parts, merged into mmdet's configuration): small models for tests.
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

from benchmarks.common import DETECTOR_OPTIONS, NUM_CLASSES, machine, train_config  # noqa: E402
from benchmarks.segmentation import _timed, train  # noqa: E402
from internimage_jax.training.trainer import TrainProgram  # noqa: E402


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model-size", default="t", choices=["t", "s", "b"])
  parser.add_argument("--image-size", type=int, default=800,
                      help="the square canvas, a multiple of 32")
  parser.add_argument("--per-device-batch", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3, help="timed calls per measurement")
  parser.add_argument("--remat", default="none", choices=["none", "block", "dots"])
  parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--options", default="{}", help="JSON overrides of the variants")
  return parser.parse_args()


def inference(program: TrainProgram, state, rng_state, batch: int, steps: int) -> list[dict]:
  """Inference of the detector of ``program``'s state (all its outputs) and of its
  backbone alone, in evaluation mode, on normalised random images."""
  det = program.merge(state, rng_state)
  det.eval()
  graphdef, weights = nnx.split(det)
  size = program.cfg.data.image_size
  images = jax.device_put(jax.random.normal(jax.random.key(1), (batch, size, size, 3)),
                          program.batch_sharding)
  parts = {"detector": lambda m, x: m(x),
           "backbone": lambda m, x: m.backbone.forward_features(x)}
  with ThreadPoolExecutor(len(parts)) as pool:  # both compile at once (outside the GIL)
    compiled = dict(zip(parts, pool.map(
        lambda fn: jax.jit(lambda w, x: fn(nnx.merge(graphdef, w), x)).lower(
            weights, images).compile(), parts.values())))
  rows = []
  for name, fn in compiled.items():
    seconds = _timed(lambda: fn(weights, images), steps)
    row = {"measurement": "inference", "model": program.cfg.model.name, "part": name,
           "call_s": seconds, "images_per_s": batch / seconds}
    if name == "detector":  # with random weights: few or none above the score threshold
      row["detections_per_image"] = float(fn(weights, images)["num"].mean())
    rows.append(row)
  return rows


def main() -> None:
  args = _parse()
  options = json.loads(args.options)
  batch = args.per_device_batch * jax.device_count()
  size = args.model_size
  programs = []
  for model, opts in ((f"internimage_{size}",
                       {k: v for k, v in options.items() if k not in DETECTOR_OPTIONS}),
                      (f"mask_rcnn_internimage_{size}", options)):
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
  det, state, rng_state = train(programs[1], steps[1], batch, args.steps)
  record(det)
  infer = {r["part"]: record(r) for r in inference(programs[1], state, rng_state, batch,
                                                   args.steps)}
  print(json.dumps({
      "summary": "detection vs classification, images/s", "image_size": args.image_size,
      "batch": batch, "remat": args.remat, "compute_dtype": args.compute_dtype,
      "options": options, "train_compile_s": round(compile_s, 1),
      "train_images_per_s": {"detection": det["images_per_s"],
                             "classification": cls["images_per_s"]},
      "train_ratio_det_over_cls": det["images_per_s"] / cls["images_per_s"],
      "inference_images_per_s": {k: r["images_per_s"] for k, r in infer.items()},
      "inference_ratio_det_over_backbone": (infer["detector"]["images_per_s"]
                                            / infer["backbone"]["images_per_s"]),
      "machine": machine(), "command": shlex.join(["python", *sys.argv]),
      "rows": rows}), flush=True)


if __name__ == "__main__":
  main()
