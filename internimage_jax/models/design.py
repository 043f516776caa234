"""The InternImage paper's design rules as code (Wang et al., CVPR 2023, section 3.2).

Stacking rules: four hyperparameters fix the layout of the four levels,

    C_i = 2^(i-1) C1      channels of level i
    G_i = C_i / C'        DCNv3 groups (C' is the channels per group)
    L1 = L2 = L4          blocks of levels 1, 2 and 4
    L1 <= L3              level 3 is the deepest ("AABA")

and the origin model (InternImage-T) is (C1, C', L1, L3) = (64, 16, 4, 18).

Scaling rule (EfficientNet's compound scaling): depth D = 3 L1 + L3 and width C1 grow
as D' = alpha^phi D and C1' = beta^phi C1 with alpha * beta^1.99 ~= 2 (doubling the
compute per unit of phi); the paper picks alpha = 1.09, beta = 1.36. C1' must stay a
multiple of C', so widths are rounded (the paper: "some adjustment", no formula given).

The paper's Table 1, against the rules (``tests/test_models.py`` checks each line):

    size  C1   C'  depths         stacking rules   scale(T, phi) with C1' = C1
    T     64   16  4, 4, 18, 4    hold (origin)     phi = 0: identical
    S     80   16  4, 4, 21, 4    hold              phi 0.73: depths 4, 4, 20, 4
    B     112  16  4, 4, 21, 4    hold              phi 1.82: depths 5, 5, 20, 5
    L     160  16  5, 5, 22, 5    hold              phi 2.98: depths 5, 5, 24, 5
    XL    192  16  5, 5, 24, 5    hold              phi 3.57: depths 5, 5, 26, 5
    H     320  32  6, 6, 32, 6    hold (C' = 32)    phi 5.23: depths 6, 6, 29, 6

The widths and groups of every size follow the rules exactly; the published depths are
near the scaling rule's but not on it (hand-picked: S +1 block, B -2, L -2, XL -2, H +3
against the rounded D'). G (not in the paper; C1 512, C' 32, depths 2, 2, 48, 4) breaks
L1 = L2 = L4. Options other than the layout (post-norm, layer scale, offset scale, the
H/G extras) are per-size choices that the rules do not cover.
"""

from __future__ import annotations

import math
from typing import Any

ALPHA = 1.09  # depth factor per unit of phi
BETA = 1.36  # width factor per unit of phi
MLP_RATIO = 4.0  # every published size


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return value


def stacking_rule(c1: int, c_group: int, l1: int, l3: int, *,
                  mlp_ratio: float = MLP_RATIO) -> dict[str, Any]:
  """Constructor options (``channels``, ``depths``, ``groups``, ``mlp_ratio``) of the
  level layout the stacking rules give for ``(C1, C', L1, L3)``; e.g.
  ``InternImage(**stacking_rule(64, 16, 4, 18), rngs=...)`` is T's layout."""
  for name, value in (("c1", c1), ("c_group", c_group), ("l1", l1), ("l3", l3)):
    _positive_int(name, value)
  if c1 % c_group:
    raise ValueError(f"c1 ({c1}) must be divisible by c_group ({c_group}): the groups of "
                     "level 1 are C1 / C'")
  if l1 > l3:
    raise ValueError(f"l1 ({l1}) must not exceed l3 ({l3}): level 3 is the deepest")
  if not mlp_ratio > 0:
    raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio!r}")
  return dict(channels=c1, depths=(l1, l1, l3, l1),
              groups=tuple((c1 << i) // c_group for i in range(4)), mlp_ratio=mlp_ratio)


def rule_parameters(options: dict[str, Any]) -> tuple[int, int, int, int]:
  """``(C1, C', L1, L3)`` of options that follow the stacking rules (else a ValueError
  naming the rule they break)."""
  try:
    c1, depths, groups = options["channels"], tuple(options["depths"]), tuple(options["groups"])
  except KeyError as e:
    raise ValueError(f"options need channels, depths and groups; {e.args[0]!r} is missing"
                     ) from None
  if len(depths) != 4 or len(groups) != 4:
    raise ValueError(f"four levels expected, got depths {depths} and groups {groups}")
  _positive_int("groups[0]", groups[0])
  if c1 % groups[0]:
    raise ValueError(f"channels ({c1}) must be divisible by groups[0] ({groups[0]})")
  c_group = c1 // groups[0]
  rule = stacking_rule(c1, c_group, depths[0], depths[2])
  for key in ("depths", "groups"):
    if tuple(options[key]) != rule[key]:
      raise ValueError(f"options do not follow the stacking rules: {key} "
                       f"{tuple(options[key])}, the rules give {rule[key]} for "
                       f"(C1, C', L1, L3) = ({c1}, {c_group}, {depths[0]}, {depths[2]})")
  return c1, c_group, depths[0], depths[2]


def scale(options: dict[str, Any], phi: float, *, alpha: float = ALPHA,
          beta: float = BETA) -> dict[str, Any]:
  """``options`` (a layout that follows the stacking rules, e.g. ``VARIANTS[
  "internimage_t"]``) scaled by the compound rule: C1' = beta^phi C1 rounded to a
  multiple of C', L1' = round(alpha^phi L1), L3' = round(alpha^phi D) - 3 L1' (at least
  L1'); C' and every other option are kept (per-block options such as H's
  ``level2_post_norm_block_ids`` may need adjusting to the new depths)."""
  c1, c_group, l1, l3 = rule_parameters(options)
  if not (math.isfinite(phi) and phi >= 0):
    raise ValueError(f"phi must be a finite number >= 0, got {phi!r}")
  if not (alpha >= 1 and beta >= 1):
    raise ValueError(f"alpha and beta must be >= 1 (the rule only grows), got {alpha}, {beta}")
  depth = alpha ** phi
  new_c1 = max(1, round(beta ** phi * c1 / c_group)) * c_group
  new_l1 = max(1, round(depth * l1))
  new_l3 = max(new_l1, round(depth * (3 * l1 + l3)) - 3 * new_l1)
  rule = stacking_rule(new_c1, c_group, new_l1, new_l3,
                       mlp_ratio=options.get("mlp_ratio", MLP_RATIO))
  return {**options, **rule}
