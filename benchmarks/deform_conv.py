"""deform_conv2d against a plain convolution of the same shape, forward and training.

    python benchmarks/deform_conv.py                      # N=8, 256 -> 256, 3x3, 28x28
    python benchmarks/deform_conv.py --dtype bfloat16 --v1
    python benchmarks/deform_conv.py --smoke              # a tiny shape, seconds

The default shape is the 3x3 convolution of ResNet-50's stage 3 (conv4_x: 256
channels in and out, stride 1, padding 1) on 448x448 images (stride 16: 28x28), batch
8, one offset group; DCNv2 (with a mask) unless ``--v1``. ``fwd`` is the jitted
forward; ``fwd_bwd`` the forward and the gradients of every input (features, offsets,
mask, weight, bias; features, weight and bias for the convolution), as a training
step needs. Times are the median of ``--repeats`` calls after a warm-up call, the two
operators' calls interleaved so that a busy machine slows both alike; ``ratio`` is
deform / conv. The compiler's temporaries + outputs are reported beside them.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, median_seconds  # noqa: E402
from internimage_jax import ops  # noqa: E402


def _inputs(n: int, c_in: int, c_out: int, size: int, k: int, groups: int, dtype):
  rng = np.random.default_rng(0)
  p = k * k
  arrays = {
      "x": rng.standard_normal((n, c_in, size, size)),
      "offset": rng.standard_normal((n, 2 * groups * p, size, size)),  # ~1 pixel moves
      "mask": rng.uniform(size=(n, groups * p, size, size)),
      "weight": rng.standard_normal((c_out, c_in, k, k)) / np.sqrt(c_in * p),
      "bias": rng.standard_normal(c_out),
      "grad_out": rng.standard_normal((n, c_out, size, size)),
  }
  return {name: jnp.asarray(a, dtype) for name, a in arrays.items()}


def _compiled(fn, args):
  """The compiled call as a zero-argument closure, compile seconds and XLA bytes."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  xla_bytes = stats.temp_size_in_bytes + stats.output_size_in_bytes if stats else None
  return (lambda: jax.block_until_ready(compiled(*args))), seconds, xla_bytes


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--channels", type=int, default=256)
  parser.add_argument("--size", type=int, default=28)
  parser.add_argument("--offset-groups", type=int, default=1)
  parser.add_argument("--v1", action="store_true", help="DCNv1 (no mask)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--smoke", action="store_true", help="tiny shape (N=1, 8 channels, 8x8)")
  args = parser.parse_args()
  if args.smoke:
    args.batch, args.channels, args.size, args.repeats = 1, 8, 8, 3

  k, pad = 3, 1
  a = _inputs(args.batch, args.channels, args.channels, args.size, k, args.offset_groups,
              jnp.dtype(args.dtype))
  mask = None if args.v1 else a["mask"]

  def deform(x, offset, mask, weight, bias):
    return ops.deform_conv2d(x, offset, weight, bias, stride=1, padding=pad, mask=mask)

  def conv(x, weight, bias):
    y = jax.lax.conv_general_dilated(x, weight, (1, 1), [(pad, pad)] * 2,
                                     dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return y + bias[:, None, None]

  def training(fn):
    def step(g, *primals):
      out, vjp = jax.vjp(fn, *primals)
      return out, vjp(g)  # the output too, as a training step needs it
    return step

  deform_args = (a["x"], a["offset"], mask, a["weight"], a["bias"])
  conv_args = (a["x"], a["weight"], a["bias"])
  cases = {
      ("deform", "fwd"): _compiled(deform, deform_args),
      ("conv", "fwd"): _compiled(conv, conv_args),
      ("deform", "fwd_bwd"): _compiled(training(deform), (a["grad_out"], *deform_args)),
      ("conv", "fwd_bwd"): _compiled(training(conv), (a["grad_out"], *conv_args)),
  }
  times = {key: [] for key in cases}
  for call, _, _ in cases.values():
    call()  # warm-up
  for _ in range(args.repeats):
    for key, (call, _, _) in cases.items():
      times[key].append(median_seconds(call, 1, warmup=0))

  result: dict[str, object] = {
      "op": "deform_conv2d", "version": "v1" if args.v1 else "v2", "dtype": args.dtype,
      "shape": {"batch": args.batch, "channels": args.channels, "size": args.size,
                "kernel": k, "padding": pad, "offset_groups": args.offset_groups},
      "repeats": args.repeats,
  }
  for mode in ("fwd", "fwd_bwd"):
    for impl in ("deform", "conv"):
      _, compile_s, xla_bytes = cases[(impl, mode)]
      result[f"{impl}_{mode}_ms"] = statistics.median(times[(impl, mode)]) * 1e3
      result[f"{impl}_{mode}_compile_s"] = compile_s
      result[f"{impl}_{mode}_xla_bytes"] = xla_bytes
    result[f"{mode}_ratio"] = result[f"deform_{mode}_ms"] / result[f"conv_{mode}_ms"]
  result["machine"] = machine()
  print(json.dumps(result))


if __name__ == "__main__":
  main()
