"""InternImage + UperNet as mmseg's ``EncoderDecoder`` (spec ``segmentation.md`` sections
1, 5, 6 and 8): the official ADE20K configurations, whole-image inference and the
training loss."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.internimage import InternImage
from internimage_jax.models.layers import Dtype
from internimage_jax.models.segmentation.heads import FCNHead, UperHead, resize

IGNORE_INDEX = 255
DECODE_LOSS_WEIGHT = 1.0
AUX_LOSS_WEIGHT = 0.4

_SEG_COMMON = dict(mlp_ratio=4.0, offset_scale=1.0)
# Backbone options of the ADE20K UperNet configs (spec section 1). Unlike classification,
# T has layer scale and S..XL initialise it at 1.0.
SEGMENTORS: dict[str, dict[str, Any]] = {
    "upernet_internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                                  layer_scale=1.0, drop_path_rate=0.2, **_SEG_COMMON),
    "upernet_internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40),
                                  layer_scale=1.0, post_norm=True, drop_path_rate=0.3,
                                  **_SEG_COMMON),
    "upernet_internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56),
                                  layer_scale=1.0, post_norm=True, drop_path_rate=0.4,
                                  **_SEG_COMMON),
    "upernet_internimage_l": dict(channels=160, depths=(5, 5, 22, 5), groups=(10, 20, 40, 80),
                                  layer_scale=1.0, post_norm=True, drop_path_rate=0.4,
                                  mlp_ratio=4.0, offset_scale=2.0),
    "upernet_internimage_xl": dict(channels=192, depths=(5, 5, 24, 5),
                                   groups=(12, 24, 48, 96), layer_scale=1.0, post_norm=True,
                                   drop_path_rate=0.4, mlp_ratio=4.0, offset_scale=2.0),
    "upernet_internimage_h": dict(channels=320, depths=(6, 6, 32, 6), groups=(10, 20, 40, 80),
                                  drop_path_rate=0.5, dw_kernel_size=5, res_post_norm=True,
                                  level2_post_norm=True,
                                  level2_post_norm_block_ids=(5, 11, 17, 23, 29),
                                  center_feature_scale=True, **_SEG_COMMON),
}
# The training crop of each official ADE20K configuration (spec section 7); its test scale
# is (4 crop, crop).
CROP_SIZES = {"upernet_internimage_t": 512, "upernet_internimage_s": 512,
              "upernet_internimage_b": 512, "upernet_internimage_l": 640,
              "upernet_internimage_xl": 640, "upernet_internimage_h": 896}
# Head options shared by every size (spec sections 3, 4, 7).
DECODE_HEAD = dict(channels=512, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1)
AUXILIARY_HEAD = dict(channels=256, in_index=2, num_convs=1, kernel_size=3, dilation=1,
                      concat_input=False, dropout_ratio=0.1)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """mmseg's ``CrossEntropyLoss`` (``avg_non_ignore=False``): per-pixel softmax cross
  entropy summed over pixels whose label is not ``IGNORE_INDEX``, divided by ALL pixels.

  ``logits`` NHWK are resized (bilinear, no antialias) to the label size ``[N, H, W]``.
  """
  logits = resize(logits, labels.shape[1:3])
  logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
  valid = labels != IGNORE_INDEX
  picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
  # Divided by every pixel, ignored ones included (not PyTorch's mean over the valid).
  return -jnp.sum(jnp.where(valid, picked, 0.0)) / labels.size


class Segmentor(nnx.Module):
  """mmseg's ``EncoderDecoder``: ``backbone`` (an ``InternImage(features_only=True)``) ->
  ``decode_head`` (+ ``auxiliary_head`` for the loss). Calling it on normalised NHWC
  images gives the decode logits resized to the input size (whole-image inference),
  NHWC ``[N, H, W, num_classes]``.

  A new segmentor is in evaluation mode; ``seg.train()`` turns on drop path, Dropout2d
  and BatchNorm batch statistics, ``seg.eval()`` turns them off.
  """

  def __init__(self, backbone: InternImage, decode_head: UperHead,
               auxiliary_head: FCNHead | None = None):
    self.backbone = backbone
    self.decode_head = decode_head
    self.auxiliary_head = auxiliary_head
    self.eval()

  def _check_images(self, images: jax.Array) -> None:
    if images.ndim != 4 or images.shape[-1] != self.backbone.in_chans:
      raise ValueError(f"Segmentor: expected NHWC images [N, H, W, {self.backbone.in_chans}], "
                       f"got shape {tuple(images.shape)}")

  def __call__(self, images: jax.Array) -> jax.Array:
    self._check_images(images)
    return resize(self.decode_head(self.backbone.forward_features(images)), images.shape[1:3])

  def loss(self, images: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """mmseg's training losses on NHWC images and ``[N, H, W]`` integer labels
    (``IGNORE_INDEX`` = 255 ignored), in the current mode: ``loss_decode`` (weight 1),
    ``loss_aux`` (weight 0.4; absent without an auxiliary head) and their sum ``loss``.
    """
    self._check_images(images)
    if labels.shape != images.shape[:3]:
      raise ValueError(f"Segmentor.loss: labels must be [N, H, W] = {tuple(images.shape[:3])} "
                       f"like the images, got shape {tuple(labels.shape)}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(f"Segmentor.loss: labels must be integers, got {labels.dtype}")
    features = self.backbone.forward_features(images)
    out = {"loss_decode": DECODE_LOSS_WEIGHT * cross_entropy(self.decode_head(features),
                                                             labels)}
    if self.auxiliary_head is not None:
      out["loss_aux"] = AUX_LOSS_WEIGHT * cross_entropy(self.auxiliary_head(features), labels)
    out["loss"] = sum(out.values())
    return out


def segmentor_options(name: str) -> dict[str, Any]:
  """Backbone options of an official UperNet configuration, with a clear error for a typo."""
  if name not in SEGMENTORS:
    raise ValueError(f"unknown segmentor {name!r}; choose one of {sorted(SEGMENTORS)}")
  return dict(SEGMENTORS[name])


def create_segmentor(name: str = "upernet_internimage_t", *, num_classes: int = 150,
                     rngs: nnx.Rngs | None = None, backbone: Mapping[str, Any] | None = None,
                     decode_head: Mapping[str, Any] | None = None,
                     auxiliary_head: Mapping[str, Any] | bool | None = None,
                     dtype: Dtype = None, param_dtype: Dtype = jnp.float32,
                     pretrained: str | os.PathLike | None = None) -> Segmentor:
  """Builds an official ADE20K UperNet (``"upernet_internimage_t"`` ... ``"_h"``).

  ``backbone``, ``decode_head`` and ``auxiliary_head`` are dicts overriding the
  constructor options of :class:`InternImage`, :class:`UperHead` and :class:`FCNHead`
  (``auxiliary_head=False`` leaves the auxiliary head out). The heads' input channels
  follow the backbone; ``dtype``/``param_dtype`` apply to all three parts unless
  overridden; ``rngs`` defaults to ``nnx.Rngs(0)``. ``pretrained`` loads a whole UperNet
  checkpoint: the published one by tag (``"ade20k"``) or a path; classifiers of another
  ``num_classes`` start afresh (a warning names them). To start only the backbone from
  a classification checkpoint, use train.py's ``init_from``.
  """
  state_dict = None
  if pretrained is not None:
    from internimage_jax import pretrained as hub

    state_dict, entry = hub.read(pretrained, name.removeprefix("upernet_"))
    if entry is not None and entry.holds != "segmentor":
      raise ValueError(f"create_segmentor: pretrained {pretrained!r} is a classification "
                       "checkpoint; 'ade20k' is the UperNet's (train.py's init_from starts "
                       "a backbone from a classifier)")
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  for part, value in (("backbone", backbone), ("decode_head", decode_head)):
    if value is not None and not isinstance(value, Mapping):
      raise ValueError(f"create_segmentor: {part} must be a dict of options, got {value!r}")
  if not (auxiliary_head is None or auxiliary_head is False or
          isinstance(auxiliary_head, Mapping)):
    raise ValueError("create_segmentor: auxiliary_head must be a dict of options or False, "
                     f"got {auxiliary_head!r}")
  for part, value in (("decode_head", decode_head), ("auxiliary_head", auxiliary_head)):
    if isinstance(value, Mapping) and "in_channels" in value:
      raise ValueError(f"create_segmentor: {part} in_channels follow the backbone; "
                       "set the backbone's channels instead")
  for option in ("num_classes", "use_clip_projector", "features_only"):
    if option in (backbone or {}):
      raise ValueError(f"create_segmentor: {option} is not an option of the segmentation "
                       "backbone (it has no classification head)")
  common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  net = InternImage(features_only=True, num_classes=0,
                    **{**common, **segmentor_options(name), **(backbone or {})})
  maps = [net.channels << i for i in range(4)]
  head = UperHead(**{**common, **DECODE_HEAD, "num_classes": num_classes,
                     **(decode_head or {}), "in_channels": maps})
  aux = None
  if auxiliary_head is not False:
    options = {**common, **AUXILIARY_HEAD, "num_classes": num_classes, **(auxiliary_head or {})}
    index = options["in_index"]
    if not 0 <= index < len(maps):
      raise ValueError(f"create_segmentor: auxiliary in_index must be in [0, 4), got {index}")
    aux = FCNHead(**options, in_channels=maps[index])
  seg = Segmentor(net, head, aux)
  if state_dict is not None:
    fresh = hub.load_segmentor(seg, state_dict, f"pretrained {pretrained!r}")
    if fresh:
      warnings.warn(f"create_segmentor({name!r}, pretrained={pretrained!r}): newly "
                    f"initialised (another class count): {', '.join(fresh)}", stacklevel=2)
  return seg


__all__ = ["AUX_LOSS_WEIGHT", "IGNORE_INDEX", "SEGMENTORS", "Segmentor", "create_segmentor",
           "cross_entropy", "segmentor_options"]
