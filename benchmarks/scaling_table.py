"""The docs/scaling.md table: ``benchmarks/scaling.py`` over models, meshes and remat.

    python benchmarks/scaling_table.py --out scaling.jsonl          # runs what is missing
    python benchmarks/scaling_table.py --out scaling.jsonl --report # the markdown table

Each case is one ``scaling.py`` process (fake CPU devices, FSDP over all of them, the
full train step compiled ahead of time); results are appended to ``--out`` as they
finish, so an interrupted run continues where it stopped.

The "largest batch" columns extrapolate each case linearly: per-device bytes
``fixed + batch * per_image`` with ``per_image = temp / batch``, which counts
batch-independent temporaries (gathered weights) as per-image and so errs low.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = (("internimage_h", 640), ("internimage_h", 384), ("internimage_g", 512))
DEVICES = (8, 32, 64)
REMAT = ("block", "none")
# Per-device memory of the cards the table answers for, in GiB.
CARDS = {"H100": 80, "H200": 141, "TPU v4": 32, "TPU v5e": 16}
GIB = 2**30


def _key(row: dict) -> tuple:
  return (row["model"], row["image_size"], row["devices"], row["remat"],
          row["per_device_batch"], row["compute_dtype"])


def run(out: Path, batch: int, compute_dtype: str) -> None:
  done = {_key(json.loads(line)) for line in out.read_text().splitlines()} if out.exists() else set()
  for model, size in CASES:
    for devices in DEVICES:
      for remat in REMAT:
        if (model, size, devices, remat, batch, compute_dtype) in done:
          continue
        command = [sys.executable, str(REPO / "benchmarks" / "scaling.py"), "--model", model,
                   "--image-size", str(size), "--per-device-batch", str(batch),
                   "--devices", str(devices), "--mesh", f"data=1,fsdp={devices}",
                   "--remat", remat, "--compute-dtype", compute_dtype]
        print(" ".join(command[1:]), flush=True)
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if proc.returncode:
          print(proc.stderr[-2000:], file=sys.stderr, flush=True)
          continue
        with out.open("a") as f:
          f.write(proc.stdout.strip().splitlines()[-1] + "\n")


def largest_batch(row: dict, gib: float) -> int:
  per_image = row["temp_bytes"] / row["per_device_batch"]
  fixed = row["total_bytes"] - row["temp_bytes"]
  return max(int((gib * GIB - fixed) // per_image), 0)


def report(out: Path) -> str:
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  rows.sort(key=lambda r: (r["model"], -r["image_size"], r["devices"], r["remat"] != "block"))
  cards = " | ".join(f"max batch {k} ({v} GiB)" for k, v in CARDS.items())
  lines = [f"| model | px | devices | remat | batch/dev | state/dev GiB (of total) | temp/dev GiB "
           f"| total/dev GiB | compile s | {cards} |",
           "|" + "---|" * (9 + len(CARDS))]
  for r in rows:
    maxes = " | ".join(str(largest_batch(r, v)) for v in CARDS.values())
    lines.append(
        f"| {r['model'].removeprefix('internimage_').upper()} | {r['image_size']} | "
        f"{r['devices']} | {r['remat']} | {r['per_device_batch']} | "
        f"{r['state_bytes_per_device'] / GIB:.2f} ({r['state_bytes_total'] / GIB:.1f}) | "
        f"{r['temp_bytes'] / GIB:.1f} | {r['total_bytes'] / GIB:.1f} | {r['compile_s']:.0f} | "
        f"{maxes} |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", type=Path, default=Path("scaling.jsonl"))
  parser.add_argument("--per-device-batch", type=int, default=16)
  parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--report", action="store_true", help="print the table of --out")
  args = parser.parse_args()
  if not args.report:
    run(args.out, args.per_device_batch, args.compute_dtype)
  print(report(args.out))


if __name__ == "__main__":
  main()
