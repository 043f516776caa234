"""Block-size configuration of the DCNv3 Pallas kernels, validated on creation."""

from __future__ import annotations

import dataclasses


def _is_power_of_two(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


@dataclasses.dataclass(frozen=True)
class TritonConfig:
  """Launch configuration of the Pallas Triton (GPU) kernels.

  ``block_q`` output pixel-groups per program (each program owns all channels of
  its groups); Triton block shapes are powers of two.
  """

  block_q: int = 64
  num_warps: int = 4
  num_stages: int = 1

  def __post_init__(self):
    for name in ("block_q", "num_warps"):
      value = getattr(self, name)
      if not isinstance(value, int) or not _is_power_of_two(value):
        raise ValueError(f"TritonConfig.{name} must be a power of two, got {value!r}")
    if not isinstance(self.num_stages, int) or self.num_stages < 1:
      raise ValueError(f"TritonConfig.num_stages must be a positive int, got {self.num_stages!r}")


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
