"""One prepared command for a lent GPU: kernel tests, then kernel and model timings.

    python benchmarks/gpu_check.py --out "$OUT"          # on the GPU machine
    python benchmarks/gpu_check.py --smoke --skip-tests  # tiny CPU run of the script itself

1. Runs the operator test files on the device (``implementation="pallas"`` is the
   compiled Triton kernel there).
2. Times forward and forward+backward of the Pallas kernel and the XLA fallback at
   the InternImage-T, -B and -H level shapes (T: batch 64 at 224 px), in float32 and
   bfloat16: median time, achieved GB/s for the bytes the operator must move, that
   as a fraction of the measured device-to-device copy bandwidth, and the speed-up.
3. Times an InternImage-T training step with each implementation (benchmarks/model.py).

Writes ``gpu_check.json`` and ``gpu_check.md`` (a RESULTS.md section) to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, median_seconds  # noqa: E402
from internimage_jax import ops  # noqa: E402
from pallas_kernels.dcnv3.shapes import StageShape, stage_shapes  # noqa: E402

IMPLS = ("pallas", "xla")


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
  """Device-to-device bandwidth in bytes/s of an elementwise pass (read + write)."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  fn = jax.jit(lambda a: a + 1.0)
  seconds = median_seconds(lambda: jax.block_until_ready(fn(x)), 10, warmup=2)
  return 2 * x.nbytes / seconds


def _arrays(shape: StageShape, dtype):
  n, s, c, g = shape.batch, shape.size, shape.channels, shape.group
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (n, s, s, c), dtype)
  offset = (2.0 * jax.random.normal(keys[1], (n, s, s, g * 18))).astype(dtype)
  mask = jax.nn.softmax(jax.random.normal(keys[2], (n, s, s, g, 9)), -1).reshape(n, s, s, g * 9)
  grad_out = jax.random.normal(keys[3], (n, s, s, c), dtype)
  return x, offset, mask.astype(dtype), grad_out


def time_case(shape: StageShape, dtype, impl: str, mode: str, repeats: int) -> dict:
  x, offset, mask, grad_out = _arrays(shape, dtype)
  op = lambda a, b, c: ops.dcnv3(a, b, c, group=shape.group, offset_scale=shape.offset_scale,
                                 implementation=impl)
  io = [x, offset, mask]
  if mode == "fwd":
    fn, args = jax.jit(op), (x, offset, mask)
    moved = sum(a.nbytes for a in io) + x.nbytes  # inputs read once, output written once
  else:
    def fwd_bwd(a, b, c, g):
      out, vjp = jax.vjp(op, a, b, c)
      return out, vjp(g)
    fn, args = jax.jit(fwd_bwd), (x, offset, mask, grad_out)
    # forward: inputs + output; backward: inputs + grad_out read, three gradients written
    moved = 2 * (sum(a.nbytes for a in io) + x.nbytes) + sum(a.nbytes for a in io)
  seconds = median_seconds(lambda: jax.block_until_ready(fn(*args)), repeats, warmup=2)
  return {"shape": shape.name, "batch": shape.batch, "size": shape.size,
          "channels": shape.channels, "group": shape.group, "dtype": jnp.dtype(dtype).name,
          "impl": impl, "mode": mode, "seconds": seconds, "bytes": moved,
          "gbps": moved / seconds / 1e9}


def model_step(impl: str, batch: int, image_size: int, extra: list[str]) -> dict:
  proc = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "model.py"), "--model", "internimage_t",
       "--batch", str(batch), "--image-size", str(image_size), "--implementation", impl,
       "--repeats", "5", *extra], capture_output=True, text=True, check=False)
  if proc.returncode:
    return {"impl": impl, "error": proc.stderr[-2000:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=".", help="folder for gpu_check.json / .md")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--skip-tests", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU run of the script)")
  args = parser.parse_args()
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  report: dict = {"date": datetime.date.today().isoformat(), "machine": machine(),
                  "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]])}

  if not args.skip_tests:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:xdist",
                           "tests/test_dcnv3_pallas.py", "tests/test_dcnv3_op.py"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    report["tests"] = {"returncode": proc.returncode, "tail": proc.stdout[-3000:]}
    print(proc.stdout[-1500:], flush=True)

  if args.smoke:
    shapes = [StageShape("smoke/level3", 1, 4, 32, 2)]
    dtypes, model_args = [jnp.float32], (1, 32, ["--options", json.dumps(
        {"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]})])
  else:
    shapes = (stage_shapes("internimage_t", 64) + stage_shapes("internimage_b", 32)
              + stage_shapes("internimage_h", 4))
    dtypes, model_args = [jnp.float32, jnp.bfloat16], (64, 224, [])
  bandwidth = copy_bandwidth(1 << 20 if args.smoke else 1 << 30)
  report["copy_bandwidth_gbps"] = bandwidth / 1e9
  rows = []
  for shape in shapes:
    for dtype in dtypes:
      for mode in ("fwd", "fwd_bwd"):
        cases = {impl: time_case(shape, dtype, impl, mode, args.repeats) for impl in IMPLS}
        for impl, r in cases.items():
          r["fraction_of_copy"] = r["gbps"] * 1e9 / bandwidth
          r["speedup_vs_xla"] = cases["xla"]["seconds"] / r["seconds"]
          rows.append(r)
          print(json.dumps(r), flush=True)
  report["operator"] = rows
  report["train_step"] = [model_step(impl, *model_args) for impl in IMPLS]
  print(json.dumps(report["train_step"]), flush=True)
  (out / "gpu_check.json").write_text(json.dumps(report, indent=1))
  (out / "gpu_check.md").write_text(to_markdown(report))


def to_markdown(report: dict) -> str:
  lines = [f"## {report['date']} — DCNv3 Pallas kernels vs XLA fallback ({report['machine']['devices'][0]})",
           "", f"Machine: {report['machine']}. Copy bandwidth "
           f"{report['copy_bandwidth_gbps']:.0f} GB/s.", "", "```", report["command"], "```", "",
           "| shape | batch | dtype | pass | impl | ms | GB/s | of copy | speed-up vs xla |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in report["operator"]:
    lines.append(f"| {r['shape']} | {r['batch']} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                 f"{r['seconds'] * 1e3:.3f} | {r['gbps']:.0f} | {r['fraction_of_copy']:.0%} | "
                 f"{r['speedup_vs_xla']:.2f}x |")
  steps = {s.get("implementation", s.get("impl")): s for s in report["train_step"]}
  if all("train_images_per_second" in s for s in steps.values()):
    ratio = steps["pallas"]["train_images_per_second"] / steps["xla"]["train_images_per_second"]
    lines += ["", "| InternImage-T train step | images/s |", "|---|---|"]
    lines += [f"| {k} | {v['train_images_per_second']:.1f} |" for k, v in steps.items()]
    lines += [f"| pallas / xla | {ratio:.2f}x |"]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
