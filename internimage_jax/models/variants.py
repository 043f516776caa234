"""The official InternImage variants (spec section 4) and ``create``."""

from __future__ import annotations

import os
import warnings
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


def create(name: str, *, num_classes: int | None = None, rngs: nnx.Rngs | None = None,
           pretrained: str | os.PathLike | None = None, **overrides: Any) -> InternImage:
  """Builds an official variant (``"internimage_t"`` ... ``"internimage_g"``).

  ``overrides`` replace any constructor option (e.g. ``drop_path_rate=0.1``,
  ``dtype=jnp.bfloat16``); ``rngs`` defaults to ``nnx.Rngs(0)``. ``pretrained`` loads
  weights: a published checkpoint by tag (``"in1k"``, ``"in22k"``, ``"22kto1k"``, or
  ``"ade20k"`` for the backbone of the UperNet; ``internimage_jax.pretrained.PUBLISHED``)
  or a checkpoint path (a train.py run's or converted directory's ``model.json`` gives
  its options). ``num_classes`` defaults to the checkpoint's head (1000 without one); a
  head of another size, or none in the checkpoint, starts afresh (a warning names it).
  """
  options = variant_options(name)
  state_dict = None
  if pretrained is not None:
    from internimage_jax import pretrained as hub

    state_dict, entry = hub.read(pretrained, name)
    if entry is None and os.path.isdir(pretrained):  # a train.py run or converted directory
      from internimage_jax.convert import read_model_json

      meta = read_model_json(pretrained)
      if meta.get("model") == name:  # its options and classes, under the caller's
        options.update(meta.get("options", {}))
        num_classes = meta.get("num_classes") if num_classes is None else num_classes
    if entry is not None and entry.holds in ("segmentor", "detector"):
      # The backbone's options there (the detectors' are the segmentors').
      from internimage_jax.models.segmentation.segmentor import segmentor_options

      options = {k: v for k, v in segmentor_options(f"upernet_{name}").items()
                 if k != "drop_path_rate"}
  options.update(overrides)
  if options.get("features_only"):  # a backbone: no classifier, no CLIP projector
    num_classes = 0 if num_classes is None else num_classes
    if "use_clip_projector" not in overrides:
      options["use_clip_projector"] = False
  elif num_classes is None and state_dict is not None and "head.weight" in state_dict:
    num_classes = int(state_dict["head.weight"].shape[0])
  model = InternImage(num_classes=1000 if num_classes is None else num_classes,
                      rngs=rngs if rngs is not None else nnx.Rngs(0), **options)
  if state_dict is not None:
    fresh = hub.load_backbone_or_classifier(model, state_dict, f"pretrained {pretrained!r}")
    if fresh:
      warnings.warn(f"create({name!r}, pretrained={pretrained!r}): the checkpoint has no "
                    f"classifier of this shape; newly initialised: {', '.join(fresh)}",
                    stacklevel=2)
  return model
