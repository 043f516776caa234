"""Block-size configuration of the DCNv3 Pallas kernels, validated on creation."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch configuration of one Pallas Triton (GPU) kernel.

  A program owns ``block_q`` output pixel-groups and all channels of each (Triton
  block shapes are powers of two). ``tile_rows`` sets which pixels those are: 1 walks
  the output row-major (a program covers a run of one row); ``r > 1`` walks tiles of
  ``r`` rows by ``block_q // (group * r)`` columns, so that a program's corners,
  which overlap between vertical neighbours too, share more cache lines.
  """

  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 1
  tile_rows: int = 1

  def __post_init__(self):
    for name in ("block_q", "num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_power_of_two(value):
        raise ValueError(f"TritonConfig.{name} must be a power of two, got {value!r}")
    for name in ("num_stages", "tile_rows"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"TritonConfig.{name} must be a positive int, got {value!r}")


# The configuration measured fastest on an H100 for both kernels at the InternImage-T
# level-0 shape (benchmarks/RESULTS.md, 2026-11-26: no swept block size beat it by
# more than the run-to-run noise).
DEFAULT_TRITON = TritonConfig()

# Per-shape launch configurations: (kernel, channels per group padded to a power of two,
# dtype name) -> TritonConfig, filled from `benchmarks/gpu_check.py`'s sweep (it prints
# the table it measured); shapes not listed run DEFAULT_TRITON.
TUNED_TRITON: dict[tuple[str, int, str], TritonConfig] = {}


def triton_config(kernel: str, padded_channels: int, dtype) -> TritonConfig:
  """The launch configuration of ``kernel`` ("forward" or "backward") for a shape."""
  if kernel not in ("forward", "backward"):
    raise ValueError(f"triton_config: kernel must be 'forward' or 'backward', got {kernel!r}")
  return TUNED_TRITON.get((kernel, padded_channels, jnp.dtype(dtype).name), DEFAULT_TRITON)


# Interpret mode runs Triton's atomic_add as a gather-then-set, which loses updates
# when one call repeats an index (jax-ml/jax#24117). With one output pixel-group per
# program, the indices of every atomic call are distinct, so the CPU check is exact.
INTERPRET_CONFIG = TritonConfig(block_q=1, num_warps=1)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Block configuration of the Pallas Mosaic (TPU) kernels.

  ``block_q`` output pixels of one (image, group) per grid step (a multiple of 8, the
  sublane count, and of ``chunk``); ``chunk`` pixels' corner rows and weights are
  copied into SMEM at a time (``chunk * 4 * P`` words each: SMEM is small).
  """

  block_q: int = 128
  chunk: int = 8

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f"MosaicConfig.chunk must be a positive int, got {self.chunk!r}")
    if (not isinstance(self.block_q, int) or self.block_q < 8 or self.block_q % 8
        or self.block_q % self.chunk):
      raise ValueError(f"MosaicConfig.block_q must be a positive multiple of 8 and of chunk "
                       f"({self.chunk}), got {self.block_q!r}")
