"""One prepared command for a lent GPU: kernel checks, kernel timings against the
fallback and the original CUDA op, training steps, launch-configuration sweep, tests.

    python benchmarks/gpu_check.py --out "$OUT" --budget 560        # one device call
    python benchmarks/gpu_check.py --out "$OUT" --budget 560 --stages train_h  # alone
    python benchmarks/gpu_check.py --smoke --out /tmp/gc          # tiny CPU run of the script
    python benchmarks/gpu_check.py --quick --out /tmp/gc          # the same, in under a minute

Stages, in order of importance, each bounded by what is left of ``--budget`` seconds
(a device lease is short), each result written to ``--out`` as soon as it exists:

1. ``correctness``: the compiled Pallas kernels against the XLA fallback at real model
   shapes (output and all three gradients; relative to the largest reference value).
2. ``operator``: forward and forward+backward time of both implementations at the
   InternImage-T level 0 and 1 shapes (batch 64 at 224 px) and B level 0 (batch 32),
   float32 and bfloat16: median time, achieved GB/s for the bytes the operator must
   move, that as a fraction of the measured device-to-device copy bandwidth, and the
   speed-up over the fallback.
3. ``train_t``: the InternImage-T training step (batch 64, 224 px) with each
   implementation (``benchmarks/model.py``).
4. ``originals``: the original DCNv3 CUDA op and DCNv4's op at the same shapes
   (float32 and float16), and the original PyTorch InternImage-T train step
   (``benchmarks/original_ops.py``), from the snapshots in ``--originals`` (built by
   ``benchmarks/build_originals.py``, started in the background at the beginning).
5. ``sweep``: each kernel alone under a set of ``TritonConfig`` launch configurations
   at the T level-0 shape, and the backward without its input-gradient atomics (their
   share of its time); prints the best configuration per kernel and dtype as entries
   of ``config.TUNED_TRITON``.
6. ``tests``: the operator's test suite on the device (``implementation="pallas_triton"``
   is the compiled Triton kernel there; the Mosaic kernels' interpreted runs skip).
7. ``train_h`` (not in the default run): the full H training step of ``train.py`` at
   640 px, remat per block, bfloat16 compute: the largest per-device batch that fits
   (``benchmarks/train_step.py``).

Writes ``gpu_check.json`` and ``gpu_check.md`` (a RESULTS.md section) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The stages that start their own processes need the GPU memory this one would
# otherwise reserve up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.common import machine, median_seconds  # noqa: E402
from internimage_jax import ops  # noqa: E402
from pallas_kernels.dcnv3 import DCNv3Params  # noqa: E402
from pallas_kernels.dcnv3.api import triton_kernels  # noqa: E402
from pallas_kernels.dcnv3.config import DEFAULT_TRITON, TritonConfig  # noqa: E402
from pallas_kernels.dcnv3.shapes import StageShape, stage_shapes  # noqa: E402

IMPLS = ("pallas", "xla")
# Block sizes and warps around the measured default (64, 4), and pixel tiles of 2 and
# 4 rows (programs whose corners overlap vertically too).
SWEEP = (TritonConfig(32, 2), TritonConfig(64, 4), TritonConfig(128, 4), TritonConfig(128, 8),
         TritonConfig(256, 8), TritonConfig(64, 4, tile_rows=2), TritonConfig(128, 4, tile_rows=2),
         TritonConfig(128, 8, tile_rows=4), TritonConfig(256, 8, tile_rows=2),
         TritonConfig(256, 8, tile_rows=4))


class Clock:
  """Seconds left of the whole run's budget."""

  def __init__(self, budget: float):
    self.deadline = time.monotonic() + budget

  def left(self) -> float:
    return self.deadline - time.monotonic()


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


def _op(shape: StageShape, impl: str):
  return lambda a, b, c: ops.dcnv3(a, b, c, group=shape.group, offset_scale=shape.offset_scale,
                                   implementation=impl)


def _fwd_bwd(op):
  def run(a, b, c, g):
    out, vjp = jax.vjp(op, a, b, c)
    return out, *vjp(g)
  return jax.jit(run)


def check_case(shape: StageShape, dtype) -> dict:
  """Compiled kernel vs fallback: max |got - want| / max |want| per output."""
  args = _arrays(shape, dtype)
  got, want = (_fwd_bwd(_op(shape, impl))(*args) for impl in IMPLS)
  errors = {}
  for name, a, b in zip(("out", "grad_x", "grad_offset", "grad_mask"), got, want):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    errors[name] = float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
  tol = 1e-4 if dtype == jnp.float32 else 3e-2
  return {"shape": shape.name, "batch": shape.batch, "dtype": jnp.dtype(dtype).name,
          "rel_error": errors, "tolerance": tol, "ok": max(errors.values()) <= tol}


def device_seconds(fn, args, repeats: int) -> float:
  """Median seconds per call: several calls per sample, dispatched asynchronously
  (device time, not launch latency)."""
  calls = 10

  def sample():
    for _ in range(calls):
      result = fn(*args)
    jax.block_until_ready(result)

  return median_seconds(sample, repeats, warmup=1) / calls


def _row(shape: StageShape, dtype, impl: str, mode: str, seconds: float, moved: int) -> dict:
  return {"shape": shape.name, "batch": shape.batch, "size": shape.size,
          "channels": shape.channels, "group": shape.group, "dtype": jnp.dtype(dtype).name,
          "impl": impl, "mode": mode, "seconds": seconds, "bytes": moved,
          "gbps": moved / seconds / 1e9}


def time_case(shape: StageShape, dtype, impl: str, mode: str, repeats: int) -> dict:
  x, offset, mask, grad_out = _arrays(shape, dtype)
  op = _op(shape, impl)
  io = sum(a.nbytes for a in (x, offset, mask))
  if mode == "fwd":
    fn, args = jax.jit(op), (x, offset, mask)
    moved = io + x.nbytes  # inputs read once, output written once
  else:
    fn, args = _fwd_bwd(op), (x, offset, mask, grad_out)
    # forward: inputs + output; backward: inputs + grad_out read, three gradients written
    moved = 2 * (io + x.nbytes) + io
  return _row(shape, dtype, impl, mode, device_seconds(fn, args, repeats), moved)


def kernel_case(shape: StageShape, dtype, kernel: str, config: TritonConfig, repeats: int,
                interpret: bool, grad_x: bool = True) -> dict:
  """One Triton kernel alone under one launch configuration."""
  kernels, why = triton_kernels()
  if kernels is None:
    raise RuntimeError(why)
  x, offset, mask, grad_out = _arrays(shape, dtype)
  params = DCNv3Params.create(group=shape.group, offset_scale=shape.offset_scale)
  io = sum(a.nbytes for a in (x, offset, mask))
  if kernel == "forward":
    fn = jax.jit(lambda a, b, c: kernels.forward(a, b, c, params=params, config=config,
                                                 interpret=interpret))
    args, moved = (x, offset, mask), io + x.nbytes
  else:
    fn = jax.jit(lambda a, b, c, g: kernels.backward(a, b, c, g, params=params, config=config,
                                                     interpret=interpret, grad_x=grad_x))
    args, moved = (x, offset, mask, grad_out), 2 * io + x.nbytes
  row = _row(shape, dtype, "pallas", kernel if grad_x else "backward without grad_x atomics",
             device_seconds(fn, args, repeats), moved)
  row["config"] = dataclasses.asdict(config)
  return row


def tuned_entries(rows: list[dict]) -> list[dict]:
  """The fastest configuration per (kernel, padded channels, dtype) of the sweep, with
  its speed-up over the default configuration measured in the same sweep."""
  best, default = {}, {}
  for r in rows:
    if r["mode"] not in ("forward", "backward"):
      continue
    cp = max(16, 1 << (r["channels"] // r["group"] - 1).bit_length())
    key = (r["mode"], cp, r["dtype"])
    if key not in best or r["seconds"] < best[key]["seconds"]:
      best[key] = r
    if r["config"] == dataclasses.asdict(DEFAULT_TRITON):
      default[key] = r
  return [{"key": list(key), "config": r["config"], "seconds": r["seconds"],
           "speedup_vs_default": (default[key]["seconds"] / r["seconds"]
                                  if key in default else None)}
          for key, r in best.items()]


def run_json(command: list[str], timeout: float, env: dict | None = None,
             partial_key: str | None = None) -> dict:
  """Runs a benchmark script that prints one JSON line last; errors become a row.
  ``partial_key``: on a timeout, the last JSON line printed that has this key, marked
  ``timed_out`` (for scripts that print a summary after each stage)."""
  try:
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                          timeout=max(timeout, 1), env={**os.environ, **(env or {})})
  except subprocess.TimeoutExpired as e:
    # What a killed child printed comes back as bytes whatever ``text`` says.
    lines = (e.stdout or b"").decode(errors="replace").splitlines()
    for line in reversed(lines if partial_key else []):
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and partial_key in row:
        return {**row, "timed_out": f"after {timeout:.0f} s"}
    return {"error": f"timed out after {timeout:.0f} s"}
  if proc.returncode:
    return {"error": (proc.stderr or proc.stdout)[-1500:]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def model_step(model: str, impl: str, batch: int, image_size: int, extra: list[str],
               timeout: float, env: dict | None = None) -> dict:
  result = run_json(
      [sys.executable, "benchmarks/model.py", "--model", model, "--batch", str(batch),
       "--image-size", str(image_size), "--implementation", impl, "--repeats", "3",
       "--train-only", *extra], timeout, env)
  result.setdefault("model", model)
  result.setdefault("implementation", impl)
  result.setdefault("batch", batch)
  return result


class Report:
  def __init__(self, out: Path, command: str):
    self.out = out
    self.data: dict = {"date": datetime.date.today().isoformat(), "machine": machine(),
                       "command": command}

  def set(self, key: str, value) -> None:
    self.data[key] = value
    self._saved(key, value)

  def append(self, key: str, row) -> None:
    self.data.setdefault(key, []).append(row)
    self._saved(key, row)

  def _saved(self, key: str, value) -> None:
    print(json.dumps({key: value}), flush=True)
    self.save()

  def save(self) -> None:
    (self.out / "gpu_check.json").write_text(json.dumps(self.data, indent=1))
    (self.out / "gpu_check.md").write_text(to_markdown(self.data))


# The originals come after the T step: their builds (started first, in the background)
# get the time of the JAX stages before them.
STAGES = ("correctness", "operator", "train_t", "originals", "sweep", "tests", "train_h",
          "operator_large")
DEFAULT_STAGES = ("correctness", "operator", "train_t", "originals", "sweep", "tests")
# Rough seconds each stage needs on an H100/H200; the budget is shared in these
# proportions. Measured on an H100: the T train step needs over 75 s per implementation
# (2026-11-26); H at 640 px 101 s to initialise and 434 s to compile its step
# (2026-11-27), so it needs a 10-minute call of its own.
STAGE_SECONDS = {"correctness": 30, "operator": 100, "originals": 60, "train_t": 200,
                 "sweep": 80, "tests": 90, "train_h": 560, "operator_large": 40}


def start_builds(src: Path, out: Path) -> subprocess.Popen | None:
  """Starts benchmarks/build_originals.py in the background (the GPU idles meanwhile
  for nothing else but this process's stages)."""
  if not src.is_dir():
    return None
  log = open(out / "build_originals.log", "w")  # noqa: SIM115 - closed with the process
  return subprocess.Popen([sys.executable, "benchmarks/build_originals.py", "--src", str(src),
                           "--out", "/tmp/originals"], cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, text=True)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=".", help="folder for gpu_check.json / .md")
  parser.add_argument("--budget", type=float, default=560, help="seconds for all stages")
  parser.add_argument("--stages", default=None,
                      help=f"comma-separated subset of {','.join(STAGES)} (default: "
                           f"{','.join(DEFAULT_STAGES)}; with --smoke all but tests and "
                           "originals; with --quick all but those and train_t)")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--originals", type=Path, default=REPO / ".originals",
                      help="snapshots of the original ops (benchmarks/build_originals.py)")
  parser.add_argument("--h-start-batch", type=int, default=None,
                      help="H images per device to start the search for the largest from "
                           "(default 80: near the largest on an H100 by the one H step "
                           "measured there; 32 with --smoke)")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (a CPU run of the script)")
  parser.add_argument("--quick", action="store_true",
                      help="--smoke at the smallest shapes with one launch configuration in "
                           "the sweep and no train step by default (with --stages train_t, "
                           "the fallback's only): the kernel stages and the report in "
                           "well under a minute on a CPU")
  args = parser.parse_args()
  smoke = args.smoke or args.quick
  # The smoke run has no GPU: no device tests, nothing of the CUDA originals. The
  # quick run skips the train step too (the fallback's alone compiles for ~20 s).
  skipped = ("tests", "originals") + (("train_t",) if args.quick else ())
  stages = (args.stages.split(",") if args.stages
            else [s for s in DEFAULT_STAGES if not (smoke and s in skipped)])
  unknown = sorted(set(stages) - set(STAGES))
  if unknown:
    parser.error(f"unknown stages {unknown}; choose from {STAGES}")
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  clock = Clock(args.budget)
  report = Report(out, " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]))
  # Off a GPU (the smoke run) the kernels run interpreted.
  interpret = jax.default_backend() != "gpu"
  builds = start_builds(args.originals, out) if "originals" in stages else None

  train_impls = IMPLS
  if args.quick:  # 16 channels per group as in --smoke, one image of 3 x 3 pixels
    level1 = [StageShape("quick/level1", 1, 3, 16, 1)]
    t_levels, large, dtypes, sweep = level1, level1, [jnp.float32], (DEFAULT_TRITON,)
    train_impls = ("xla",)  # the kernels' interpreted train step takes minutes
  elif args.smoke:
    level1 = [StageShape("smoke/level1", 2, 6, 32, 2)]
    t_levels, large, dtypes, sweep = level1, level1, [jnp.float32], SWEEP[:2]
  if smoke:
    tiny = ["--options", json.dumps({"channels": 16, "depths": [1, 1, 1, 1],
                                     "groups": [1, 2, 4, 8]})]
    t_step, h_step = (1, 32, tiny), ("internimage_t", 32, [*tiny, "--limit-gib", "2"])
    h_start = args.h_start_batch or 32
    operator_shapes = t_levels
  else:
    t_levels = stage_shapes("internimage_t", 64)
    large = [stage_shapes("internimage_b", 32)[0], stage_shapes("internimage_h", 4)[0]]
    dtypes, sweep = [jnp.float32, jnp.bfloat16], SWEEP
    t_step, h_step = (64, 224, []), ("internimage_h", 640, [])
    h_start = args.h_start_batch or 80
    operator_shapes = [t_levels[0], t_levels[1], large[0]]

  if "correctness" in stages:
    for shape in dict.fromkeys((t_levels[0], large[0])):  # one shape when smoke
      for dtype in dtypes:
        try:
          row = check_case(shape, dtype)
        except Exception as e:  # noqa: BLE001 - a kernel that fails to compile is a finding
          row = {"shape": shape.name, "dtype": jnp.dtype(dtype).name, "ok": False,
                 "error": f"{type(e).__name__}: {str(e)[-1500:]}"}
        report.append("correctness", row)

  bandwidth = None
  if {"operator", "sweep", "operator_large", "originals"} & set(stages):
    bandwidth = copy_bandwidth(1 << 20 if smoke else 1 << 30)
    report.set("copy_bandwidth_gbps", bandwidth / 1e9)

  def operator(key: str, shapes: list[StageShape], keep: float) -> None:
    """Times both implementations while more than ``keep`` seconds are left."""
    for shape in shapes:
      for dtype in dtypes:
        for mode in ("fwd", "fwd_bwd"):
          if clock.left() < keep:
            return
          try:
            cases = {impl: time_case(shape, dtype, impl, mode, args.repeats) for impl in IMPLS}
          except Exception as e:  # noqa: BLE001 - recorded, the other cases still run
            report.append(f"{key}_errors", f"{shape.name} {jnp.dtype(dtype).name} {mode}: "
                          f"{type(e).__name__}: {str(e)[-800:]}")
            continue
          for impl, r in cases.items():
            r["fraction_of_copy"] = r["gbps"] * 1e9 / bandwidth
            r["speedup_vs_xla"] = cases["xla"]["seconds"] / r["seconds"]
            report.append(key, r)

  # Each stage stops (between cases) where the later stages' share of the budget begins.
  weights = {s: STAGE_SECONDS[s] for s in stages}

  def keep(stage: str) -> float:
    later = STAGES[STAGES.index(stage) + 1:]
    return args.budget * sum(weights.get(s, 0) for s in later) / sum(weights.values())

  if "operator" in stages:
    operator("operator", operator_shapes, keep("operator"))

  if "train_t" in stages:
    for i, impl in enumerate(train_impls):
      share = (clock.left() - keep("train_t")) / (len(train_impls) - i)
      report.append("train_t", model_step("internimage_t", impl, *t_step, timeout=share))

  if "originals" in stages:
    if builds is None:
      report.set("originals_errors", {"build": f"no snapshots at {args.originals} "
                                               "(benchmarks/build_originals.py)"})
    else:
      wait = max(clock.left() - keep("originals") - 60, 1)
      try:
        builds.wait(timeout=wait)
      except subprocess.TimeoutExpired:
        builds.kill()
      built = (out / "build_originals.log").read_text().strip().splitlines()
      status = json.loads(built[-1]) if built and built[-1].startswith("{") else {}
      report.set("originals_build", status or {
          "error": "\n".join(built[-20:]) or f"no result within {wait:.0f} s"})
      folders = {k: v.split(" (")[0] for k, v in status.items() if isinstance(v, str)}
      command = [sys.executable, "benchmarks/original_ops.py", "--out", str(out / "original.json"),
                 "--shapes", ",".join(f"{s.name.split('/')[0]}:{s.batch}:{s.name[-1]}"
                                      for s in operator_shapes),
                 "--repeats", str(args.repeats)]
      if "dcnv3" in folders:
        command += ["--dcnv3", str(Path(folders["dcnv3"])),
                    "--internimage", str(Path(folders["dcnv3"]).parent)]
      if "dcnv4" in folders:
        command += ["--dcnv4", folders["dcnv4"]]
      if folders:
        result = run_json(command, max(clock.left() - keep("originals"), 1))
        original = out / "original.json"
        if original.is_file():
          result = json.loads(original.read_text())
        for r in result.get("rows", []):
          r["fraction_of_copy"] = r["gbps"] * 1e9 / bandwidth
          report.append("originals", r)
        if result.get("train_t"):
          report.append("train_t", result["train_t"])
        if result.get("errors") or result.get("error"):
          report.set("originals_errors", result.get("errors") or result.get("error"))

  if "sweep" in stages:
    for dtype in dtypes:
      for kernel in ("forward", "backward"):
        for config in sweep:
          if clock.left() < keep("sweep"):
            break
          try:
            r = kernel_case(t_levels[0], dtype, kernel, config, args.repeats, interpret)
          except Exception as e:  # noqa: BLE001
            report.append("sweep_errors",
                          f"{config} {kernel}: {type(e).__name__}: {str(e)[-800:]}")
            continue
          r["fraction_of_copy"] = r["gbps"] * 1e9 / bandwidth
          report.append("sweep", r)
      if clock.left() > keep("sweep"):
        try:  # the input gradient's atomics: the backward with and without them
          r = kernel_case(t_levels[0], dtype, "backward", DEFAULT_TRITON, args.repeats,
                          interpret, grad_x=False)
          r["fraction_of_copy"] = r["gbps"] * 1e9 / bandwidth
          report.append("sweep", r)
        except Exception as e:  # noqa: BLE001
          report.append("sweep_errors", f"backward without atomics: {type(e).__name__}: {e}")
    report.set("tuned", tuned_entries(report.data.get("sweep", [])))

  if "tests" in stages:
    timeout = max(clock.left() - keep("tests"), 1)
    try:
      # One slow test (a Triton compile) must not hide the others' results.
      per_test = (["--timeout", "60"] if importlib.util.find_spec("pytest_timeout") else [])
      proc = subprocess.run(
          [sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=8", "-p",
           "no:cacheprovider", "-p", "no:xdist", *per_test,
           "tests/test_dcnv3_backends.py"],
          cwd=REPO, capture_output=True, text=True, timeout=timeout)
      report.set("tests", {"returncode": proc.returncode, "tail": proc.stdout[-4000:]})
    except subprocess.TimeoutExpired as e:
      tail = e.stdout or b""
      tail = tail.decode() if isinstance(tail, bytes) else tail
      report.set("tests", {"returncode": None, "error": f"timed out after {timeout:.0f} s",
                           "tail": tail[-2500:]})

  if "train_h" in stages:
    model, size, extra = h_step
    timeout = clock.left() - keep("train_h")
    # This stage runs alone on the device: its allocator may take most of the memory.
    # The model's "auto" implementation is the kernel on one GPU.
    report.set("train_h", run_json(
        [sys.executable, "benchmarks/train_step.py", "--model", model, "--image-size",
         str(size), "--start-batch", str(h_start), "--remat", "block",
         "--compute-dtype", "bfloat16", "--budget", str(max(timeout - 20, 1)), *extra],
        timeout, env={"XLA_PYTHON_CLIENT_PREALLOCATE": "true"}, partial_key="rows"))

  if "operator_large" in stages:
    operator("operator_large", large, 10)
  if builds is not None and builds.poll() is None:
    builds.kill()
  print(f"done with {clock.left():.0f} s of the budget left", flush=True)


def _train_h_markdown(h: dict) -> list[str]:
  """The H step's batch search (benchmarks/train_step.py's summary) as a table."""
  if "error" in h:
    return [f"train_h: error: {h['error'].strip().splitlines()[-1][:300]}", ""]
  gib = lambda b: "" if b is None else f"{b / 2**30:.1f}"
  lines = [f"train_h: {h['model']} at {h['image_size']} px, remat {h['remat']}, "
           f"{h['compute_dtype']} compute, state {gib(h['state_bytes_per_device'])} GiB, "
           f"allocator limit {gib(h['bytes_limit'])} GiB, init {h['init_s']} s"
           + (f"; timed out {h['timed_out']}" if "timed_out" in h else "") + ".", "",
           "| batch/device | compile s | step s | images/s | XLA total GiB | peak GiB | result |",
           "|---|---|---|---|---|---|---|"]
  for r in h["rows"]:
    done = "step_s" in r
    step = f"{r['step_s']:.3f} | {r['images_per_s']:.1f}" if done else " | "
    if done:
      result = "ran, autotuned" if r.get("autotuned") else "ran"
      if r.get("compiled_by") == "search":
        result += " (the search's executable)"
    elif "fits" in r:  # a compile-only step of the search
      result = "fits by analysis" if r["fits"] else "over the limit by analysis"
    else:
      result = r.get("error", "").splitlines()[0][:120] if r.get("error") else ""
    compile_s = r.get("compile_s", r.get("analysis_compile_s", ""))
    lines.append(f"| {r['batch_per_device']} | {compile_s} | {step} | "
                 f"{gib(r.get('total_bytes'))} | {gib(r.get('peak_bytes_in_use'))} | {result} |")
  return lines + [""]


def _originals_markdown(report: dict) -> list[str]:
  """The original CUDA op and DCNv4 beside the Pallas kernels (same shape, pass and
  precision; the originals' float16 is set against the kernels' bfloat16)."""
  pallas = {(r["shape"], r["batch"], r["dtype"], r["mode"]): r["seconds"]
            for r in report.get("operator", []) if r["impl"] == "pallas"}
  lines = ["| originals: shape | batch | dtype | pass | impl | ms | GB/s | of copy "
           "| pallas speed-up |", "|---|---|---|---|---|---|---|---|---|"]
  for r in report["originals"]:
    ours = pallas.get((r["shape"], r["batch"],
                       "bfloat16" if r["dtype"] == "float16" else r["dtype"], r["mode"]))
    speedup = "" if ours is None else f"{r['seconds'] / ours:.2f}x"
    lines.append(f"| {r['shape']} | {r['batch']} | {r['dtype']} | {r['mode']} | {r['impl']} | "
                 f"{r['seconds'] * 1e3:.3f} | {r['gbps']:.0f} | "
                 f"{r.get('fraction_of_copy', 0):.0%} | {speedup} |")
  return lines + [""]


def to_markdown(report: dict) -> str:
  devices = report["machine"]["devices"]
  lines = [f"## {report['date']} — DCNv3 Pallas kernels vs XLA fallback ({devices[0]})",
           "", f"Machine: {report['machine']}.", "", "```", report["command"], "```", ""]
  if "copy_bandwidth_gbps" in report:
    lines += [f"Device-to-device copy bandwidth: {report['copy_bandwidth_gbps']:.0f} GB/s.", ""]
  if report.get("correctness"):
    lines += ["| correctness: shape | dtype | out | grad_x | grad_offset | grad_mask | ok |",
              "|---|---|---|---|---|---|---|"]
    for r in report["correctness"]:
      if "error" in r:
        lines.append(f"| {r['shape']} | {r['dtype']} | error: {r['error'].splitlines()[-1][:150]} "
                     "| | | | False |")
        continue
      e = r["rel_error"]
      lines.append(f"| {r['shape']} b{r['batch']} | {r['dtype']} | {e['out']:.1e} | "
                   f"{e['grad_x']:.1e} | {e['grad_offset']:.1e} | {e['grad_mask']:.1e} | "
                   f"{r['ok']} |")
    lines.append("")
  for key in ("operator", "operator_large", "sweep"):
    if not report.get(key):
      continue
    lines += [f"| {key}: shape | batch | dtype | pass | impl | ms | GB/s | of copy | vs xla |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report[key]:
      impl = r["impl"] + (f" {r['config']}" if "config" in r else "")
      speedup = f"{r['speedup_vs_xla']:.2f}x" if "speedup_vs_xla" in r else ""  # not in sweep
      lines.append(f"| {r['shape']} | {r['batch']} | {r['dtype']} | {r['mode']} | {impl} | "
                   f"{r['seconds'] * 1e3:.3f} | {r['gbps']:.0f} | "
                   f"{r.get('fraction_of_copy', 0):.0%} | {speedup} |")
    lines.append("")
  if report.get("originals"):
    lines += _originals_markdown(report)
  if report.get("tuned"):
    lines += ["Fastest launch configuration per kernel in the sweep (entries for "
              "`config.TUNED_TRITON`, with the speed-up over the default):", "", "```python"]
    for t in report["tuned"]:
      kernel, cp, dtype = t["key"]
      speedup = "" if t["speedup_vs_default"] is None else f"  # {t['speedup_vs_default']:.2f}x"
      lines.append(f"(\"{kernel}\", {cp}, \"{dtype}\"): TritonConfig(**{t['config']}),{speedup}")
    lines += ["```", ""]
  for key in ("originals_build", "originals_errors"):
    if report.get(key):
      lines += [f"{key}: `{json.dumps(report[key])[:600]}`", ""]
  if "tests" in report:
    lines += ["Kernel tests on the device:", "", "```", report["tests"]["tail"][-800:].strip(),
              "```", ""]
  if report.get("train_h"):
    lines += _train_h_markdown(report["train_h"])
  if report.get("train_t"):
    lines += ["| train_t: model | impl | batch | images/s | step s | compile s | peak GiB |",
              "|---|---|---|---|---|---|---|"]
    for s in report["train_t"]:
      if "error" in s:
        lines.append(f"| {s['model']} | {s['implementation']} | {s['batch']} | error: "
                     f"{s['error'].strip().splitlines()[-1][:120]} | | | |")
        continue
      peak = s.get("peak_bytes_in_use")
      compile_s = s.get("train_compile_seconds", s.get("first_step_seconds"))
      lines.append(f"| {s['model']} | {s['implementation']} | {s['batch']} | "
                   f"{s['train_images_per_second']:.1f} | {s['train_step_seconds']:.3f} | "
                   f"{compile_s:.0f} | {'' if peak is None else f'{peak / 2**30:.1f}'} |")
    lines.append("")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
