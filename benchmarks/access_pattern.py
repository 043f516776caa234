"""The cache lines a Triton program's corner gathers touch, per launch configuration
(computed on the CPU; no GPU needed).

    python benchmarks/access_pattern.py --variant internimage_t --level 0 --batch 4

Walks the kernels' own lane mapping (``triton.lanes``) and bilinear corners
(``reference.bilinear_corners``) with offsets drawn as ``gpu_check.py`` draws them
(N(0, 2) pixels), and reports the mean per program of: corner rows gathered (inside
the image), distinct rows, distinct 128-byte lines. Fewer distinct lines for the same
gathers leave more of them to the SM's L1; whether L1 keeps them is a GPU question
(the sweep in ``gpu_check.py``). Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from pallas_kernels.dcnv3 import DCNv3Params  # noqa: E402
from pallas_kernels.dcnv3.config import TritonConfig  # noqa: E402
from pallas_kernels.dcnv3.reference import bilinear_corners  # noqa: E402
from pallas_kernels.dcnv3.shapes import stage_shapes  # noqa: E402
from pallas_kernels.dcnv3.triton import Geometry, lanes  # noqa: E402

LINE_BYTES = 128


def program_footprint(shape, config: TritonConfig, itemsize: int = 4, seed: int = 0) -> dict:
  params = DCNv3Params.create(group=shape.group, offset_scale=shape.offset_scale)
  geo = Geometry(params, shape.batch, shape.size, shape.size, shape.channels, config)
  programs = -(-geo.lanes // geo.block_q)
  t = jnp.arange(programs * geo.block_q).reshape(programs, geo.block_q)
  q, live, n, g, cx, cy = lanes(geo, t, jnp.float32)
  offset = 2.0 * np.random.default_rng(seed).standard_normal((geo.q, geo.p, 2))
  gathered, distinct_rows, distinct_lines = [], [], []
  rows_per_point = []
  for p in range(geo.p):
    gx, gy = params.grid_offset(p)
    s = params.offset_scale
    px = cx + s * gx + s * jnp.asarray(offset[:, p, 0], jnp.float32)[q]
    py = cy + s * gy + s * jnp.asarray(offset[:, p, 1], jnp.float32)[q]
    for k in bilinear_corners(px, py, batch=n, group_index=g, group=geo.g, height=geo.h,
                              width=geo.w):
      rows_per_point.append(np.where(np.asarray(k.inside & live), np.asarray(k.index), -1))
  rows = np.concatenate(rows_per_point, axis=1)  # [programs, block_q * 4P]
  row_bytes = geo.cp * itemsize
  for program in rows:
    used = program[program >= 0]
    gathered.append(used.size)
    unique = np.unique(used)
    distinct_rows.append(unique.size)
    distinct_lines.append(np.unique(unique * row_bytes // LINE_BYTES).size)
  return {"shape": shape.name, "batch": shape.batch, "config": config.__dict__,
          "programs": int(programs), "corner_rows": float(np.mean(gathered)),
          "distinct_rows": float(np.mean(distinct_rows)),
          "distinct_lines": float(np.mean(distinct_lines))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variant", default="internimage_t")
  parser.add_argument("--level", type=int, default=0)
  parser.add_argument("--batch", type=int, default=4)
  args = parser.parse_args()
  shape = stage_shapes(args.variant, args.batch)[args.level]
  for config in (TritonConfig(64, 4), TritonConfig(64, 4, tile_rows=2),
                 TritonConfig(64, 4, tile_rows=4), TritonConfig(128, 4),
                 TritonConfig(128, 4, tile_rows=4), TritonConfig(256, 8, tile_rows=4)):
    print(json.dumps(program_footprint(shape, config)), flush=True)


if __name__ == "__main__":
  main()
