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
