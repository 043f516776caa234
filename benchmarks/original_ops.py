"""What users would otherwise run, timed on the same GPU: the original CUDA op of
DCNv3, DCNv4's op, and the original PyTorch InternImage-T train step.

    python benchmarks/original_ops.py --dcnv3 BUILD/ops_dcnv3 --dcnv4 BUILD/DCNv4_op \\
        --internimage BUILD/classification --out original.json

Nothing of those projects is in this repository: ``benchmarks/build_originals.sh``
builds them on the machine from a snapshot carried there (never committed). Each
``--dcnv3`` / ``--dcnv4`` / ``--internimage`` that is missing or fails to import is a
row with its error; the others still run. Shapes and timing match
``benchmarks/gpu_check.py``: the InternImage level shapes of ``pallas_kernels/dcnv3/
shapes.py``, median of ``--repeats`` samples of 10 calls dispatched back to back (CUDA
events around them), after warm-up; forward+backward is both calls. Prints a JSON
line per row and writes them all to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pallas_kernels.dcnv3.shapes import StageShape, stage_shapes  # noqa: E402

CALLS = 10


def cuda_seconds(fn, repeats: int) -> float:
  """Median seconds per call of ``fn`` (``CALLS`` calls per sample, CUDA events)."""
  import torch

  fn()
  torch.cuda.synchronize()
  samples = []
  for _ in range(repeats):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(CALLS):
      fn()
    end.record()
    end.synchronize()
    samples.append(start.elapsed_time(end) / 1e3 / CALLS)
  return statistics.median(samples)


def _inputs(shape: StageShape, dtype, points: int = 9):
  """The operator's inputs as gpu_check makes them: N(0, 2) offsets, softmax mask."""
  import torch

  n, s, c, g = shape.batch, shape.size, shape.channels, shape.group
  gen = torch.Generator(device="cuda").manual_seed(0)
  x = torch.randn(n, s, s, c, device="cuda", generator=gen).to(dtype)
  offset = (2.0 * torch.randn(n, s, s, g * points * 2, device="cuda", generator=gen)).to(dtype)
  mask = torch.randn(n, s, s, g, points, device="cuda", generator=gen).softmax(-1)
  grad_out = torch.randn(n, s, s, c, device="cuda", generator=gen).to(dtype)
  return x, offset, mask.reshape(n, s, s, g * points).to(dtype), grad_out


def _row(shape: StageShape, dtype, impl: str, mode: str, seconds: float, moved: int) -> dict:
  return {"shape": shape.name, "batch": shape.batch, "size": shape.size,
          "channels": shape.channels, "group": shape.group, "dtype": str(dtype).split(".")[-1],
          "impl": impl, "mode": mode, "seconds": seconds, "bytes": moved,
          "gbps": moved / seconds / 1e9}


def dcnv3_rows(build: Path, shapes: list[StageShape], dtypes, repeats: int) -> list[dict]:
  """The original CUDA op (``DCNv3.dcnv3_forward`` / ``dcnv3_backward``), called
  directly with the arguments its autograd Function passes (im2col_step 256, as
  its module)."""

  sys.path.insert(0, str(build))
  import DCNv3  # the extension built by build_originals.sh

  rows = []
  for shape in shapes:
    g, c = shape.group, shape.channels // shape.group
    geometry = (3, 3, 1, 1, 1, 1, 1, 1, g, c, shape.offset_scale)
    for dtype in dtypes:
      x, offset, mask, grad_out = _inputs(shape, dtype)
      io = sum(t.numel() * t.element_size() for t in (x, offset, mask))
      fwd = lambda: DCNv3.dcnv3_forward(x, offset, mask, *geometry, 256, 0)

      def fwd_bwd():
        fwd()
        return DCNv3.dcnv3_backward(x, offset, mask, *geometry, grad_out, 256, 0)

      for mode, fn, moved in (("fwd", fwd, io + x.numel() * x.element_size()),
                              ("fwd_bwd", fwd_bwd, 3 * io + 2 * x.numel() * x.element_size())):
        rows.append(_row(shape, dtype, "original_cuda", mode, cuda_seconds(fn, repeats), moved))
        print(json.dumps(rows[-1]), flush=True)
  return rows


def dcnv4_rows(build: Path, shapes: list[StageShape], dtypes, repeats: int) -> list[dict]:
  """DCNv4's op through its autograd Function (its own launch table). DCNv4 takes
  offsets and mask logits interleaved in one tensor padded to a multiple of 8
  channels and applies no softmax: the same bytes of sampling data, one tensor."""
  import torch

  sys.path.insert(0, str(build))
  from DCNv4.functions import DCNv4Function

  rows = []
  for shape in shapes:
    n, s, c, g = shape.batch, shape.size, shape.channels, shape.group
    width = int(math.ceil(g * 9 * 3 / 8) * 8)
    for dtype in dtypes:
      x, offset, mask, grad_out = _inputs(shape, dtype)
      offset_mask = torch.cat([offset.reshape(n, s, s, g, 9, 2), mask.reshape(n, s, s, g, 9, 1)],
                              -1).reshape(n, s, s, g * 27)
      offset_mask = torch.nn.functional.pad(offset_mask, (0, width - g * 27)).contiguous()
      call = lambda a, b: DCNv4Function.apply(a, b, 3, 3, 1, 1, 1, 1, 1, 1, g, c // g,
                                              shape.offset_scale, 256, 0)
      io = sum(t.numel() * t.element_size() for t in (x, offset, mask))

      def fwd():
        with torch.no_grad():
          return call(x, offset_mask)

      xg, omg = x.detach().requires_grad_(True), offset_mask.detach().requires_grad_(True)

      def fwd_bwd():
        xg.grad = omg.grad = None
        call(xg, omg).backward(grad_out)

      for mode, fn, moved in (("fwd", fwd, io + x.numel() * x.element_size()),
                              ("fwd_bwd", fwd_bwd, 3 * io + 2 * x.numel() * x.element_size())):
        rows.append(_row(shape, dtype, "dcnv4", mode, cuda_seconds(fn, repeats), moved))
        print(json.dumps(rows[-1]), flush=True)
  return rows


def train_step_row(classification: Path, dcnv3_build: Path, batch: int, image_size: int,
                   repeats: int) -> dict:
  """The original InternImage-T (its own model code, the DCNv3 CUDA op) train step:
  forward, cross-entropy, backward, AdamW; float32, drop path 0.1 (its T recipe), as
  benchmarks/model.py does for the JAX model."""
  import torch

  sys.path.insert(0, str(dcnv3_build))
  sys.path.insert(0, str(classification))
  # The original imports the built extension's version through pkg_resources, which
  # an in-place build has no metadata for.
  pkg = types.ModuleType("pkg_resources")
  pkg.get_distribution = lambda name: types.SimpleNamespace(version="1.1")
  sys.modules.setdefault("pkg_resources", pkg)
  from models.intern_image import InternImage

  model = InternImage(core_op="DCNv3", channels=64, depths=[4, 4, 18, 4], groups=[4, 8, 16, 32],
                      mlp_ratio=4.0, drop_path_rate=0.1, offset_scale=1.0, post_norm=False,
                      num_classes=1000).cuda().train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
  images = torch.randn(batch, 3, image_size, image_size, device="cuda")
  labels = torch.arange(batch, device="cuda") % 1000

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()

  start = time.perf_counter()
  step()
  torch.cuda.synchronize()
  first = time.perf_counter() - start
  step_seconds = cuda_seconds(step, repeats)
  return {"model": "internimage_t (original, PyTorch)", "implementation": "original_cuda",
          "batch": batch, "image_size": image_size, "train_step_seconds": step_seconds,
          "train_images_per_second": batch / step_seconds, "first_step_seconds": first,
          "peak_bytes_in_use": torch.cuda.max_memory_allocated(), "torch": torch.__version__}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dcnv3", type=Path, help="built ops_dcnv3 folder (holds DCNv3*.so)")
  parser.add_argument("--dcnv4", type=Path, help="built DCNv4_op folder")
  parser.add_argument("--internimage", type=Path,
                      help="the original's classification folder (models/intern_image.py)")
  parser.add_argument("--shapes", default="internimage_t:64:0,internimage_t:64:1,"
                      "internimage_b:32:0", help="variant:batch:level, comma-separated")
  parser.add_argument("--dtypes", default="float32,float16")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--train-batch", type=int, default=64)
  parser.add_argument("--out", type=Path, default=Path("original.json"))
  args = parser.parse_args()

  import torch

  if not torch.cuda.is_available():
    print(json.dumps({"error": f"torch {torch.__version__} sees no CUDA device"}))
    sys.exit(1)
  shapes = [stage_shapes(v, int(b))[int(level)]
            for v, b, level in (item.split(":") for item in args.shapes.split(","))]
  dtypes = [getattr(torch, name) for name in args.dtypes.split(",")]
  result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": [],
            "errors": {}}

  def attempt(name, fn):
    try:
      value = fn()
    except Exception as e:  # noqa: BLE001 - a build that does not load is a finding
      result["errors"][name] = f"{type(e).__name__}: {str(e)[-800:]}"
      print(json.dumps({"error": name, "message": result["errors"][name]}), flush=True)
      return
    if isinstance(value, list):
      result["rows"] += value
    else:
      result[name] = value
      print(json.dumps({name: value}), flush=True)
    args.out.write_text(json.dumps(result, indent=1))

  if args.dcnv3:
    attempt("dcnv3", lambda: dcnv3_rows(args.dcnv3, shapes, dtypes, args.repeats))
  if args.dcnv4:
    attempt("dcnv4", lambda: dcnv4_rows(args.dcnv4, shapes, dtypes, args.repeats))
  if args.internimage and args.dcnv3:
    attempt("train_t", lambda: train_step_row(args.internimage, args.dcnv3, args.train_batch,
                                              224, max(3, args.repeats // 4)))
  args.out.write_text(json.dumps(result, indent=1))
  print(json.dumps({"summary": {"rows": len(result["rows"]), "errors": result["errors"]}}))


if __name__ == "__main__":
  main()
