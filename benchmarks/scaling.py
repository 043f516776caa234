"""Per-device memory and compile time of a full train step on a device mesh, from
abstract shapes only (nothing of the model is allocated).

    python benchmarks/scaling.py --model internimage_h --image-size 640 \\
        --per-device-batch 16 --devices 8 --mesh data=1,fsdp=8 --remat block
    python benchmarks/scaling.py --model upernet_internimage_h --image-size 896 \\
        --per-device-batch 2 --devices 8 --mesh data=1,fsdp=8 --remat block

Builds the training program of ``train.py`` (augmentation, forward, backward, AdamW
with clipping and LR groups, EMA) for ``--devices`` fake CPU devices, compiles it
ahead of time and prints one JSON line: ``compiled.memory_analysis()`` per device
(argument, output, alias, temp and total bytes), the compile time, and the bytes
per device of the parameters and of the whole train state. An ``upernet_internimage_*``
model is the ADE20K recipe of its size (150 classes, crop ``--image-size``, no EMA), a
``mask_rcnn_internimage_*`` one the COCO 1x recipe (80 classes, canvas ``--image-size``,
a multiple of 32, no EMA; ``--options`` entries ``neck``, ``rpn_head``, ``roi_head``,
``test_cfg``, ``train_cfg`` configure its other parts): ``benchmarks.common.train_config``.

Expected for the command above (2-core AMD EPYC, jax 0.10.2, 2026-12-03): total
17.57 GB (16.37 GiB) per device, of which 2.20 GB is the sharded state (17.43 GB in
all), compiled in 30-45 s. docs/scaling.md has H and G over 8, 32 and 64 devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="internimage_h")
  parser.add_argument("--image-size", type=int, default=640)
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--devices", type=int, default=8, help="fake CPU devices")
  parser.add_argument("--mesh", default="data=1,fsdp=-1", help="axis=size,... (-1: the rest)")
  parser.add_argument("--remat", default="none", choices=["none", "block", "dots"])
  parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--accum-steps", type=int, default=1)
  parser.add_argument("--no-ema", action="store_true",
                      help="without the EMA copy (the segmentation recipes have none)")
  parser.add_argument("--options", default="{}", help="JSON overrides of the variant")
  parser.add_argument("--init", action="store_true",
                      help="compile the step and the sharded init together, as train.py does: "
                           "seconds until each is compiled (step_s, init_s) and the time to "
                           "the first step (first_step_s: build, then both)")
  return parser.parse_args()


def main() -> None:
  args = _parse()
  # The device count is fixed when JAX starts: set it before the first import.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from benchmarks.common import NUM_CLASSES, machine, memory_report, train_config, tree_bytes
  from internimage_jax.training.trainer import TrainProgram

  cfg = train_config(args.model, args.image_size, args.per_device_batch * args.devices,
                     args.mesh, args.remat, args.compute_dtype, args.accum_steps,
                     ema=False if args.no_ema else None, options=json.loads(args.options))
  start = time.perf_counter()
  program = TrainProgram(cfg, num_classes=NUM_CLASSES[cfg.task], steps_per_epoch=1000)
  build_s = time.perf_counter() - start
  timings = {"build_s": round(build_s, 1)}
  start = time.perf_counter()
  if args.init:
    # As train.py starts: the step compiles in the background while the init compiles.
    step = program.train_step.compile_ahead(*program.abstract_inputs())
    program.init.compile_ahead().result()
    timings["init_s"] = round(time.perf_counter() - start, 1)
    compiled = step.result()
    timings["step_s"] = round(time.perf_counter() - start, 1)
    timings["first_step_s"] = round(build_s + time.perf_counter() - start, 1)
  else:
    lowered = program.train_step.lower(*program.abstract_inputs())
    timings["lower_s"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    compiled = lowered.compile()
    timings["compile_s"] = round(time.perf_counter() - start, 1)

  state = program.abstract_state
  report = {
      "model": args.model, "image_size": args.image_size,
      "per_device_batch": args.per_device_batch, "devices": args.devices,
      "mesh": dict(program.mesh.shape), "remat": args.remat,
      "compute_dtype": args.compute_dtype, "accum_steps": args.accum_steps,
      "options": json.loads(args.options),
      "task": cfg.task, "ema": bool(cfg.train.ema_decay),
      "param_bytes_total": tree_bytes(state["params"]),
      "param_bytes_per_device": tree_bytes(state["params"], per_device=True),
      "state_bytes_total": tree_bytes(state),
      "state_bytes_per_device": tree_bytes(state, per_device=True),
      **timings, "machine": machine(),
  }
  report.update(memory_report(compiled))
  print(json.dumps(report))


if __name__ == "__main__":
  main()
