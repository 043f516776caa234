"""Serving exports of a classifier: export time, and images/s of the ONNX model in
onnxruntime against the same model in JAX, in one run.

    python benchmarks/export.py --model internimage_t --image-size 224 --batch 8

Both serve the same function (uint8 images in, logits out, normalisation inside) with
the same random weights: JAX as the jitted function with the weights as constants (the
XLA fallback of DCNv3, the program ``to_stablehlo`` exports), onnxruntime on its CPU
provider with its default threads. Every weight gets a little noise: a fresh model's
zero-initialised offset and mask projections are uniform matrices, which XLA:CPU
(jaxlib 0.10.2) miscompiles as constants (``docs/export.md``); trained ones are not. Export times include tracing; the ONNX one also the
writing of the file. Throughput is from the median of ``--repeats`` calls of each,
alternating, after a warm-up call of each. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import machine  # noqa: E402
from internimage_jax import export, models  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="internimage_t")
  parser.add_argument("--image-size", type=int, default=224)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--options", default="{}", help="JSON overrides of the variant")
  args = parser.parse_args()

  model = models.create(args.model, num_classes=1000, rngs=nnx.Rngs(0), implementation="xla",
                        **json.loads(args.options))
  params = nnx.state(model, nnx.Param)
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(params))))
  nnx.update(model, jax.tree.map(
      lambda p: p + 1e-3 * jax.random.normal(next(keys), p.shape, p.dtype), params))
  images = np.random.default_rng(0).integers(
      0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
  result: dict[str, object] = {"model": args.model, "image_size": args.image_size,
                               "batch": args.batch, "machine": machine()}

  start = time.perf_counter()
  exported = export.to_stablehlo(model, image_size=args.image_size, batch=None,
                                 platforms=("cpu",))
  result["stablehlo_export_s"] = time.perf_counter() - start
  result["stablehlo_bytes"] = len(exported.serialize())

  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    path = export.to_onnx(model, Path(tmp) / "model.onnx", image_size=args.image_size)
    result["onnx_export_s"] = time.perf_counter() - start
    result["onnx_bytes"] = sum(p.stat().st_size for p in Path(tmp).iterdir())
    start = time.perf_counter()
    onnxruntime_fn = export.onnx.load(path)
    result["onnxruntime_session_s"] = time.perf_counter() - start

    jax_fn = jax.jit(export.serving_function(model, args.image_size))
    start = time.perf_counter()
    want = np.asarray(jax_fn(images))
    result["jax_first_call_s"] = time.perf_counter() - start
    got = onnxruntime_fn(images)
    result["max_abs_difference_over_max_logit"] = float(
        np.abs(got - want).max() / np.abs(want).max())

    # Interleaved, so that a slower spell of the machine costs both the same.
    times: dict[str, list[float]] = {"jax": [], "onnxruntime": []}
    for _ in range(args.repeats):
      for name, fn in (("jax", lambda: jax_fn(images).block_until_ready()),
                       ("onnxruntime", lambda: onnxruntime_fn(images))):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    jax_s, onnxruntime_s = (statistics.median(times[k]) for k in ("jax", "onnxruntime"))
  result["jax_images_per_s"] = args.batch / jax_s
  result["onnxruntime_images_per_s"] = args.batch / onnxruntime_s
  result["onnxruntime_over_jax"] = jax_s / onnxruntime_s
  print(json.dumps(result))


if __name__ == "__main__":
  main()
