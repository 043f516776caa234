"""Static parameters of the DCNv3 sampling operator, validated once.

Every backend (the XLA fallback and the Pallas kernels) takes the same frozen,
hashable :class:`DCNv3Params`, so it can be a static argument of ``jax.jit`` and a
non-differentiable argument of ``jax.custom_vjp``.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

IntOrPair = int | Sequence[int]


def pair(value: IntOrPair, name: str) -> tuple[int, int]:
  """``(h, w)`` from an int or a pair of ints; a ValueError naming ``name`` otherwise
  (for every operator of the project)."""
  def is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)

  if is_int(value):
    return int(value), int(value)
  try:
    h, w = value
  except (TypeError, ValueError):
    h = w = None
  if not (is_int(h) and is_int(w)):
    raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
  return int(h), int(w)


@dataclasses.dataclass(frozen=True)
class DCNv3Params:
  """Geometry of the sampling operator (spec section 1). All pairs are ``(h, w)``."""

  kernel: tuple[int, int]
  stride: tuple[int, int]
  pad: tuple[int, int]
  dilation: tuple[int, int]
  group: int
  offset_scale: float
  remove_center: bool

  @classmethod
  def create(
      cls,
      *,
      kernel_size: IntOrPair = 3,
      stride: IntOrPair = 1,
      pad: IntOrPair = 1,
      dilation: IntOrPair = 1,
      group: int,
      offset_scale: float = 1.0,
      remove_center: bool = False,
  ) -> DCNv3Params:
    params = cls(
        kernel=pair(kernel_size, "dcnv3: kernel_size"),
        stride=pair(stride, "dcnv3: stride"),
        pad=pair(pad, "dcnv3: pad"),
        dilation=pair(dilation, "dcnv3: dilation"),
        group=group,
        offset_scale=float(offset_scale),
        remove_center=bool(remove_center),
    )
    params.validate()
    return params

  def validate(self) -> None:
    for name, (a, b), low in (
        ("kernel_size", self.kernel, 1),
        ("stride", self.stride, 1),
        ("dilation", self.dilation, 1),
        ("pad", self.pad, 0),
    ):
      if a < low or b < low:
        raise ValueError(f"dcnv3: {name} must be >= {low}, got {(a, b)}")
    if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
      raise ValueError(f"dcnv3: group must be a positive int, got {self.group!r}")
    kh, kw = self.kernel
    if self.remove_center and (kh != kw or kh % 2 == 0):
      raise ValueError(
          f"dcnv3: remove_center needs an odd square kernel, got kernel_size {(kh, kw)}"
      )

  @property
  def num_points(self) -> int:
    """P, the sampling points per group."""
    kh, kw = self.kernel
    return kh * kw - int(self.remove_center)

  def output_size(self, height: int, width: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel, self.stride, self.pad, self.dilation
    ho = (height + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    wo = (width + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    return ho, wo

  def grid_offset(self, point):
    """Fixed ``(dx, dy)`` of sampling point ``point`` relative to the centre.

    Points are enumerated x-outer, y-inner (``p = ix * kh + iy``), the original's
    order; with ``remove_center`` the middle point is skipped. ``point`` is a Python
    int or an integer array (a loop index inside a kernel).
    """
    (kh, kw), (dh, dw) = self.kernel, self.dilation
    k = point
    if self.remove_center:
      after = point >= (kh * kw - 1) // 2  # past the centre: skip one
      k = point + (after.astype(point.dtype) if hasattr(after, "astype") else int(after))
    return (k // kh) * dw - (dw * (kw - 1)) // 2, (k % kh) * dh - (dh * (kh - 1)) // 2

  def kernel_grid(self) -> list[tuple[int, int]]:
    """``grid_offset`` of every point, in point order."""
    return [self.grid_offset(p) for p in range(self.num_points)]
