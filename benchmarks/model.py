"""InternImage end to end: compile time, inference and train-step images/s.

    python benchmarks/model.py --model internimage_t --image-size 224 --batch 8

Inference is the jitted eval-mode forward; the train step is forward, backward and
an AdamW update with the state donated. Compile time is the first call's time less
a steady-state call's; throughput is from the median of ``--repeats`` calls. Prints
one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine, median_seconds  # noqa: E402
from internimage_jax import models  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="internimage_t")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--implementation", default="auto")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", default="none", choices=["none", "block", "dots"])
  parser.add_argument("--train-only", action="store_true", help="skip the inference timing")
  parser.add_argument("--options", default="{}", help="JSON overrides of the variant")
  args = parser.parse_args()

  dtype = jnp.dtype(args.dtype)

  # One compiled initialisation: op-by-op (eager) init compiles every distinct
  # parameter shape's ops separately, which takes minutes on a GPU.
  @nnx.jit
  def build():
    model = models.create(args.model, implementation=args.implementation, dtype=dtype,
                          drop_path_rate=0.1, remat=args.remat, **json.loads(args.options))
    return model, nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.05), wrt=nnx.Param)

  start = time.perf_counter()
  model, optimizer = jax.block_until_ready(build())
  init_seconds = time.perf_counter() - start
  images = jax.random.normal(jax.random.key(0), (args.batch, args.image_size, args.image_size, 3))
  labels = jnp.arange(args.batch) % model.num_classes

  @nnx.jit
  def infer(model, x):
    return model(x)

  @nnx.jit(donate_argnums=(0, 1))
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x).astype(jnp.float32)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  result = {"model": args.model, "image_size": args.image_size, "batch": args.batch,
            "implementation": args.implementation, "dtype": args.dtype, "remat": args.remat,
            "init_seconds": init_seconds, "machine": machine()}
  # Compile time = first call (trace + compile + run) minus a steady-state call.
  if not args.train_only:
    model.eval()
    run_infer = lambda: jax.block_until_ready(infer(model, images))
    start = time.perf_counter()
    run_infer()
    first = time.perf_counter() - start
    seconds = median_seconds(run_infer, args.repeats, warmup=0)
    result["infer_compile_seconds"] = first - seconds
    result["infer_images_per_second"] = args.batch / seconds

  model.train()
  run_train = lambda: jax.block_until_ready(train_step(model, optimizer, images, labels))
  start = time.perf_counter()
  result["first_loss"] = float(run_train())
  first = time.perf_counter() - start
  seconds = median_seconds(run_train, args.repeats, warmup=0)
  result["train_compile_seconds"] = first - seconds
  result["train_images_per_second"] = args.batch / seconds
  result["train_step_seconds"] = seconds
  # Accelerators report their allocator's high-water mark (the CPU client does not).
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
    result["bytes_limit"] = stats.get("bytes_limit")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
