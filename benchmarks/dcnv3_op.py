"""DCNv3 operator: time and peak memory at the InternImage-T stage shapes.

    python benchmarks/dcnv3_op.py --batch 8 64 --json dcnv3_op.json
    python benchmarks/dcnv3_op.py --batch 8 --torch-reference /path/to/InternImage

Each case runs in fresh worker processes, so one case's memory never counts toward
another's. Time is the median over ``--repeats`` rounds of three calls per
implementation after compilation, all implementations timed in one worker with
their rounds interleaved, with the default allocator. Peak memory is measured in a second worker: the growth of the
process RSS during one call, sampled at ~2 kHz with glibc set to return large blocks
on free; the same measure for JAX and for PyTorch. For JAX the compiler's own count
(temporaries + outputs) is reported beside it.

``--torch-reference`` takes a checkout of the original InternImage repository and
times its pure-PyTorch path (``dcnv3_core_pytorch``, grid_sample based) in the same
run. Nothing of it is copied here; its module is loaded from that checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import MALLOC_ENV, PeakRSS, machine, median_seconds  # noqa: E402

MODES = ("fwd", "fwd_bwd")


def _inputs(case: dict):
  import numpy as np

  n, s, c, g = case["batch"], case["size"], case["channels"], case["group"]
  rng = np.random.default_rng(0)
  dtype = np.float32  # bfloat16 runs cast from these
  x = rng.standard_normal((n, s, s, c)).astype(dtype)
  offset = (2.0 * rng.standard_normal((n, s, s, g * 18))).astype(dtype)
  logits = rng.standard_normal((n, s, s, g, 9))
  mask = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).reshape(n, s, s, g * 9)
  grad_out = rng.standard_normal((n, s, s, c)).astype(dtype)
  return x, offset, mask.astype(dtype), grad_out


def _jax_call(case: dict, impl: str):
  """A zero-argument call running the case, and the compiler's numbers for it."""
  import time

  import jax
  import jax.numpy as jnp

  from internimage_jax import ops

  dtype = jnp.dtype(case["dtype"])
  arrays = [jnp.asarray(a, dtype) for a in _inputs(case)]
  op = lambda x, o, m: ops.dcnv3(x, o, m, group=case["group"], offset_scale=case["offset_scale"],
                                 implementation=impl)
  if case["mode"] == "fwd":
    fn, args = jax.jit(op), arrays[:3]
  else:
    def fwd_bwd(x, o, m, g):
      out, vjp = jax.vjp(op, x, o, m)
      return out, vjp(g)  # the output too, as a training step needs it

    fn, args = jax.jit(fwd_bwd), arrays
  start = time.perf_counter()
  compiled = fn.lower(*args).compile()
  stats = compiled.memory_analysis()
  info = {"compile_seconds": time.perf_counter() - start,
          "xla_temp_plus_output_bytes": stats.temp_size_in_bytes + stats.output_size_in_bytes}
  return (lambda: jax.block_until_ready(compiled(*args))), info


def _load_original(checkout: str):
  """The original's pure-PyTorch DCNv3 core, loaded from a checkout of its repository."""
  import importlib.util
  import types
  import warnings

  # Its module imports the compiled CUDA extension and pkg_resources at the top, though
  # dcnv3_core_pytorch needs neither; stand-ins let it import on a CPU-only machine.
  sys.modules.setdefault("DCNv3", types.ModuleType("DCNv3"))
  pkg = types.ModuleType("pkg_resources")
  pkg.get_distribution = lambda name: types.SimpleNamespace(version="1.0")
  sys.modules.setdefault("pkg_resources", pkg)
  path = Path(checkout) / "classification" / "ops_dcnv3" / "functions" / "dcnv3_func.py"
  spec = importlib.util.spec_from_file_location("original_dcnv3_func", path)
  module = importlib.util.module_from_spec(spec)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    spec.loader.exec_module(module)
  return module.dcnv3_core_pytorch


def _torch_call(case: dict):
  import warnings

  import torch

  warnings.simplefilter("ignore")
  torch.set_num_threads(os.cpu_count() or 1)
  core = _load_original(case["torch_reference"])
  x, offset, mask, grad_out = (torch.from_numpy(a.astype("float32")) for a in _inputs(case))
  g, c = case["group"], case["channels"]
  args = (3, 3, 1, 1, 1, 1, 1, 1, g, c // g, case["offset_scale"], 0)
  if case["mode"] == "fwd":
    def call():
      with torch.no_grad():
        return core(x, offset, mask, *args)
    return call, {}
  leaves = [t.requires_grad_(True) for t in (x, offset, mask)]

  def call():
    for t in leaves:
      t.grad = None
    out = core(*leaves, *args)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]
  return call, {}


def _worker(case: dict) -> None:
  """Times every implementation of the case in one process, calls interleaved, so
  that a busy neighbour slows them alike; or measures one implementation's memory."""
  calls = {impl: (_torch_call(case) if impl == "torch" else _jax_call(case, impl))
           for impl in case["impls"]}
  results = {impl: dict(info) for impl, (_, info) in calls.items()}
  if case["measure"] == "time":
    times = {impl: [] for impl in calls}
    for impl, (call, _) in calls.items():
      call()  # compile / warm up
    # Rounds of a few consecutive calls per implementation: the first call after a
    # switch can be slowed by the other library's worker threads still spinning,
    # and the median discards it.
    for _ in range(case["repeats"]):
      for impl, (call, _) in calls.items():
        for _ in range(3):
          times[impl].append(median_seconds(call, 1, warmup=0))
    for impl in calls:
      results[impl]["seconds"] = statistics.median(times[impl])
  else:
    (impl, (call, _)), = calls.items()
    call()  # first-call allocations of the runtime are not the operator's
    with PeakRSS() as peak:
      out = call()
    del out
    results[impl]["peak_rss_bytes"] = peak.peak_growth
  print(json.dumps(results))


def _spawn(case: dict, impls: list[str]) -> dict[str, dict]:
  """Time all ``impls`` in one worker, then each one's memory in a worker of its own."""
  jobs = [("time", impls, {})] + [("memory", [impl], MALLOC_ENV) for impl in impls]
  results = {impl: dict(case, impl=impl) for impl in impls}
  for measure, job_impls, extra_env in jobs:
    spec = {**case, "measure": measure, "impls": job_impls}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env={**os.environ, **extra_env},
                          check=False)
    if proc.returncode:
      raise RuntimeError(f"worker failed for {spec}:\n{proc.stderr[-3000:]}")
    for impl, values in json.loads(proc.stdout.strip().splitlines()[-1]).items():
      results[impl].update(values)
  return results


def main() -> None:
  from pallas_kernels.dcnv3.shapes import stage_shapes

  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[8, 64])
  parser.add_argument("--variant", default="internimage_t")
  parser.add_argument("--levels", type=int, nargs="+", default=[0, 1, 2, 3])
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--impl", nargs="+", default=["xla"])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--torch-reference", default=None,
                      help="checkout of the original InternImage repository")
  parser.add_argument("--json", default=None, help="write all results to this file")
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    _worker(json.loads(args.worker))
    return

  impls = list(args.impl) + (["torch"] if args.torch_reference else [])
  results = []
  print(f"# {machine()}", flush=True)
  print(f"{'shape':28} {'batch':>5} {'mode':8} {'impl':6} {'ms':>9} {'peak MiB':>9} "
        f"{'XLA MiB':>8}", flush=True)
  for batch in args.batch:
    for level in args.levels:
      shape = stage_shapes(args.variant, batch)[level]
      for mode in args.modes:
        case = dict(shape=shape.name, batch=batch, size=shape.size, channels=shape.channels,
                    group=shape.group, offset_scale=shape.offset_scale, mode=mode,
                    dtype=args.dtype, repeats=args.repeats, torch_reference=args.torch_reference)
        for impl, r in _spawn(case, impls).items():
          results.append(r)
          xla = r.get("xla_temp_plus_output_bytes")
          print(f"{shape.name:28} {batch:5d} {mode:8} {impl:6} {r['seconds'] * 1e3:9.2f} "
                f"{r['peak_rss_bytes'] / 2**20:9.1f} "
                f"{'' if xla is None else f'{xla / 2**20:8.1f}'}", flush=True)
  if "torch" in impls:
    print("\nratios (torch / jax; > 1 means JAX is faster or smaller)")
    for r in results:
      if r["impl"] == "torch":
        continue
      ref = next(t for t in results if t["impl"] == "torch" and t["shape"] == r["shape"]
                 and t["batch"] == r["batch"] and t["mode"] == r["mode"])
      # The larger of JAX's two memory measures, to err against ourselves.
      mine = max(r["peak_rss_bytes"], r.get("xla_temp_plus_output_bytes", 0), 1)
      print(f"{r['shape']:28} {r['batch']:5d} {r['mode']:8} {r['impl']:6} "
            f"time x{ref['seconds'] / r['seconds']:.2f}  "
            f"peak memory x{ref['peak_rss_bytes'] / mine:.2f}")
  if args.json:
    Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=1))


if __name__ == "__main__":
  main()
