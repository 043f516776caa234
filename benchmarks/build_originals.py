"""Builds the original DCNv3 CUDA op and DCNv4's op from snapshots, for
``benchmarks/original_ops.py`` (on a GPU machine with PyTorch, CUDA and ninja).

    python benchmarks/build_originals.py --src .originals --out /tmp/originals

``--src`` holds snapshots that are never committed here: ``InternImage/classification/
{ops_dcnv3,models}`` from OpenGVLab/InternImage and ``DCNv4/DCNv4_op`` from
OpenGVLab/DCNv4, e.g. from local clones::

    mkdir -p .originals/InternImage .originals/DCNv4
    git -C InternImage archive HEAD classification/ops_dcnv3 classification/models \\
        | tar -x -C .originals/InternImage
    git -C DCNv4 archive HEAD DCNv4_op | tar -x -C .originals/DCNv4

The sources are copied to ``--out`` and compiled there with PyTorch's JIT extension
builder (their setup.py refuses to run where ``torch.cuda.is_available()`` is false,
and installs into site-packages). One change is made to the copy: current PyTorch
headers dispatch on ``Tensor.scalar_type()``, where the original's two
``AT_DISPATCH_FLOATING_TYPES_AND_HALF`` calls pass ``Tensor.type()``. Both builds run
at once; prints one JSON line with each build's folder or error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DCNV4_FLAGS = ["-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
               "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "-O3"]


def _build(name: str, sources: list[Path], include: Path, folder: Path, cuda_flags: list[str],
           jobs: int) -> str:
  """Compiles ``sources`` into ``folder/<name>*.so`` and imports it once."""
  os.environ["MAX_JOBS"] = str(jobs)
  os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # Hopper: H100, H200
  from torch.utils.cpp_extension import load

  start = time.perf_counter()
  load(name=name, sources=[str(s) for s in sources], extra_include_paths=[str(include)],
       extra_cflags=["-O3", "-DWITH_CUDA"], extra_cuda_cflags=["-DWITH_CUDA", *cuda_flags],
       build_directory=str(folder), with_cuda=True, verbose=False)
  return f"{folder} ({time.perf_counter() - start:.0f} s)"


def build_dcnv3(src: Path, out: Path, jobs: int) -> str:
  classification = out / "classification"
  shutil.copytree(src / "InternImage" / "classification", classification, dirs_exist_ok=True)
  ops = classification / "ops_dcnv3"
  cu = ops / "src" / "cuda" / "dcnv3_cuda.cu"
  text = cu.read_text()
  patched = text.replace('input.type(), "ms_deform_attn', 'input.scalar_type(), "ms_deform_attn')
  if patched.count("input.scalar_type()") != 2:
    raise RuntimeError(f"{cu}: expected the original's two dispatch calls on input.type()")
  cu.write_text(patched)
  sources = [ops / "src" / "vision.cpp", *sorted((ops / "src" / "cpu").glob("*.cpp")),
             *sorted((ops / "src" / "cuda").glob("*.cu"))]
  return _build("DCNv3", sources, ops / "src", ops, [], jobs)


def build_dcnv4(src: Path, out: Path, jobs: int) -> str:
  root = out / "DCNv4_op"
  shutil.copytree(src / "DCNv4" / "DCNv4_op", root, dirs_exist_ok=True)
  sources = [root / "src" / "vision.cpp", *sorted((root / "src" / "cuda").glob("*.cu"))]
  # `from DCNv4 import ext`: the extension module lives inside the package.
  _build("ext", sources, root / "src", root / "DCNv4", DCNV4_FLAGS, jobs)
  return str(root)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", type=Path, default=Path(".originals"))
  parser.add_argument("--out", type=Path, default=Path("/tmp/originals"))
  parser.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                      help="compile jobs per build (the two builds run at once)")
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  result = {}
  with ProcessPoolExecutor(2) as pool:
    futures = {"dcnv3": pool.submit(build_dcnv3, args.src, args.out, args.jobs),
               "dcnv4": pool.submit(build_dcnv4, args.src, args.out, args.jobs)}
    for name, future in futures.items():
      try:
        result[name] = future.result()
      except Exception as e:  # noqa: BLE001 - reported; the other build still counts
        result[name] = {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
  print(json.dumps(result), flush=True)
  sys.exit(0 if all(isinstance(v, str) for v in result.values()) else 1)


if __name__ == "__main__":
  main()
