"""The official InternImage variants (spec section 4) and ``create``."""

from __future__ import annotations

from typing import Any

from flax import nnx

from internimage_jax.models.internimage import InternImage

_HG_COMMON = dict(dw_kernel_size=5, center_feature_scale=True, use_clip_projector=True,
                  level2_post_norm=True)

VARIANTS: dict[str, dict[str, Any]] = {
    "internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                          offset_scale=1.0),
    "internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40),
                          post_norm=True, layer_scale=1e-5),
    "internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56),
                          post_norm=True, layer_scale=1e-5),
    "internimage_l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80),
                          post_norm=True, layer_scale=1e-5, offset_scale=2.0),
    "internimage_xl": dict(channels=192, depths=(5, 5, 24, 5), groups=(12, 24, 48, 96),
                           post_norm=True, layer_scale=1e-5, offset_scale=2.0),
    "internimage_h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80),
                          res_post_norm=True, level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                          **_HG_COMMON),
    "internimage_g": dict(channels=512, depths=(2, 2, 48, 4), groups=(16, 32, 64, 128),
                          post_norm=True, level2_post_norm_block_ids=tuple(range(5, 48, 6)),
                          **_HG_COMMON),
}

# The resolution each published checkpoint was trained and evaluated at.
IMAGE_SIZES: dict[str, int] = {
    "internimage_t": 224, "internimage_s": 224, "internimage_b": 224, "internimage_l": 384,
    "internimage_xl": 384, "internimage_h": 640, "internimage_g": 512,
}


def variant_options(name: str) -> dict[str, Any]:
  """Constructor options of an official variant, with a clear error for a typo."""
  if name not in VARIANTS:
    raise ValueError(f"unknown InternImage variant {name!r}; choose one of {sorted(VARIANTS)}")
  return dict(VARIANTS[name])


def create(name: str, *, num_classes: int = 1000, rngs: nnx.Rngs | None = None,
           **overrides: Any) -> InternImage:
  """Builds an official variant (``"internimage_t"`` ... ``"internimage_g"``).

  ``overrides`` replace any constructor option (e.g. ``drop_path_rate=0.1``,
  ``dtype=jnp.bfloat16``); ``rngs`` defaults to ``nnx.Rngs(0)``.
  """
  options = variant_options(name)
  options.update(overrides)
  return InternImage(num_classes=num_classes, rngs=rngs if rngs is not None else nnx.Rngs(0),
                     **options)
