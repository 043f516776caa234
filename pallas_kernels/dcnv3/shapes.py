"""Real-model DCNv3 shapes, shared by tests and benchmarks.

Every DCNv3 call in InternImage uses a 3x3 kernel, stride 1, pad 1, dilation 1; a
level ``i`` of a network with stem width ``Cs`` at image size ``S`` runs on a
``S/4/2**i`` square map with ``Cs * 2**i`` channels in ``groups[i]`` groups.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class StageShape:
  """One level's operator shape: ``x`` is ``[batch, size, size, channels]``."""

  name: str
  batch: int
  size: int
  channels: int
  group: int
  offset_scale: float = 1.0

  @property
  def group_channels(self) -> int:
    return self.channels // self.group


# (stem width, groups per level, offset_scale, image size) of the official variants.
VARIANTS: dict[str, tuple[int, tuple[int, int, int, int], float, int]] = {
    "internimage_t": (64, (4, 8, 16, 32), 1.0, 224),
    "internimage_s": (80, (5, 10, 20, 40), 1.0, 224),
    "internimage_b": (112, (7, 14, 28, 56), 1.0, 224),
    "internimage_l": (160, (10, 20, 40, 80), 2.0, 384),
    "internimage_xl": (192, (12, 24, 48, 96), 2.0, 384),
    "internimage_h": (320, (10, 20, 40, 80), 1.0, 640),
    "internimage_g": (512, (16, 32, 64, 128), 1.0, 512),
}


def stage_shapes(variant: str, batch: int, image_size: int | None = None) -> list[StageShape]:
  """The four level shapes of an official variant at its (or the given) image size."""
  stem, groups, offset_scale, default_size = VARIANTS[variant]
  size = (image_size or default_size) // 4
  return [
      StageShape(f"{variant}/level{i}", batch, size >> i, stem << i, groups[i], offset_scale)
      for i in range(4)
  ]
