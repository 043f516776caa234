"""Mask R-CNN with FPN on InternImage (mmdetection's ``MaskRCNN``), its official
configurations and ``create_detector``."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from internimage_jax.models.detection.fpn import FPN
from internimage_jax.models.detection.roi_head import (
    FCNMaskHead, Shared2FCBBoxHead, detect, extract_rois, paste_masks)
from internimage_jax.models.detection.rpn import RPNHead, proposals
from internimage_jax.models.internimage import InternImage
from internimage_jax.models.layers import Dtype
from internimage_jax.models.segmentation.segmentor import segmentor_options

# The backbones of the official COCO configs: the detection backbone is the segmentation
# one (spec detection.md section 1), with the same options per size (T: layer scale 1.0,
# drop path 0.2; S: post-norm, 0.3; B: post-norm, 0.4).
DETECTORS: dict[str, dict[str, Any]] = {
    f"mask_rcnn_internimage_{size}": segmentor_options(f"upernet_internimage_{size}")
    for size in ("t", "s", "b")}

# mmdet's configuration of the parts (spec sections 2-9), under mmdet's own keys. The
# channels the neck gives (256 officially) are filled in by ``create_detector`` from
# ``neck.out_channels`` wherever a part reads them, unless that part sets its own.
NECK = dict(out_channels=256, num_outs=5)
RPN_HEAD = dict(anchor_generator=dict(scales=[8], ratios=[0.5, 1.0, 2.0],
                                      strides=[4, 8, 16, 32, 64]))
ROI_HEAD = dict(
    bbox_roi_extractor=dict(roi_layer=dict(output_size=7, sampling_ratio=0),
                            featmap_strides=[4, 8, 16, 32], finest_scale=56),
    bbox_head=dict(fc_out_channels=1024, roi_feat_size=7),
    mask_roi_extractor=dict(roi_layer=dict(output_size=14, sampling_ratio=0),
                            featmap_strides=[4, 8, 16, 32], finest_scale=56),
    mask_head=dict(num_convs=4, conv_out_channels=256))
# mmdet's train_cfg of the official configs (spec section 10).
TRAIN_CFG = dict(
    rpn=dict(sampler=dict(num=256, pos_fraction=0.5)),
    rpn_proposal=dict(nms_pre=2000, max_per_img=1000, nms=dict(iou_threshold=0.7),
                      min_bbox_size=0),
    rcnn=dict(sampler=dict(num=512, pos_fraction=0.25), mask_size=28))
TEST_CFG = dict(
    rpn=dict(nms_pre=1000, max_per_img=1000, nms=dict(iou_threshold=0.7), min_bbox_size=0),
    rcnn=dict(score_thr=0.05, nms=dict(iou_threshold=0.5), max_per_img=100,
              mask_thr_binary=0.5))


def merge(base: Mapping[str, Any], override: Mapping[str, Any] | None, where: str
          ) -> dict[str, Any]:
  """``base`` with ``override`` merged in recursively; a key ``base`` lacks is an error
  naming it (a typo would otherwise be ignored)."""
  out = copy.deepcopy(dict(base))
  for key, value in (override or {}).items():
    if key not in out:
      raise ValueError(f"create_detector: unknown option {where}.{key}; "
                       f"{where} has {sorted(out)}")
    if isinstance(out[key], Mapping):
      if not isinstance(value, Mapping):
        raise ValueError(f"create_detector: {where}.{key} must be a dict, got {value!r}")
      out[key] = merge(out[key], value, f"{where}.{key}")
    else:
      out[key] = value
  return out


class RoIHead(nnx.Module):
  """mmdet's ``StandardRoIHead``: the box head and the mask head, each on RoIAlign
  features of its own size."""

  def __init__(self, cfg: Mapping[str, Any], num_classes: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    box, mask = cfg["bbox_head"], cfg["mask_head"]
    self.cfg = cfg
    self.bbox_head = Shared2FCBBoxHead(box["in_channels"], num_classes,
                                       fc_out_channels=box["fc_out_channels"],
                                       roi_feat_size=box["roi_feat_size"], **kw)
    self.mask_head = FCNMaskHead(mask["in_channels"], num_classes,
                                 conv_out_channels=mask["conv_out_channels"],
                                 num_convs=mask["num_convs"], **kw)

  def rois(self, maps, boxes, extractor: str) -> jax.Array:
    """One image's RoIAlign features for ``boxes`` with the ``extractor``'s settings."""
    cfg = self.cfg[extractor]
    return extract_rois(maps[:len(cfg["featmap_strides"])], boxes, cfg["featmap_strides"],
                        cfg["roi_layer"]["output_size"], cfg["finest_scale"],
                        sampling_ratio=cfg["roi_layer"]["sampling_ratio"])


class MaskRCNN(nnx.Module):
  """mmdet's ``MaskRCNN``: InternImage features -> FPN -> RPN proposals -> box and mask
  heads. Images are NHWC and already normalised; shapes are static (see ``__call__``).
  A new detector is in evaluation mode."""

  def __init__(self, backbone: InternImage, neck: FPN, rpn_head: RPNHead, roi_head: RoIHead,
               *, anchor_strides, test_cfg: Mapping[str, Any],
               train_cfg: Mapping[str, Any] = TRAIN_CFG):
    self.backbone = backbone
    self.neck = neck
    self.rpn_head = rpn_head
    self.roi_head = roi_head
    self.anchor_strides = tuple(anchor_strides)
    self.test_cfg = test_cfg
    self.train_cfg = train_cfg
    self.eval()

  def _image_shapes(self, images: jax.Array, image_shapes: jax.Array | None) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != self.backbone.in_chans:
      raise ValueError(f"MaskRCNN: expected NHWC images [N, H, W, {self.backbone.in_chans}], "
                       f"got shape {tuple(images.shape)}")
    if image_shapes is None:
      return jnp.tile(jnp.asarray(images.shape[1:3], jnp.float32), (images.shape[0], 1))
    image_shapes = jnp.asarray(image_shapes)
    if image_shapes.shape != (images.shape[0], 2):
      raise ValueError(f"MaskRCNN: image_shapes must be [N, 2] (height, width) = "
                       f"[{images.shape[0]}, 2], got shape {tuple(image_shapes.shape)}")
    return image_shapes

  def _rpn(self, images: jax.Array, image_shapes: jax.Array):
    maps = self.neck(self.backbone.forward_features(images))
    logits, deltas = self.rpn_head(maps)
    cfg = self.test_cfg["rpn"]
    props = proposals(logits, deltas, self.anchor_strides, image_shapes,
                      nms_pre=cfg["nms_pre"], max_per_img=cfg["max_per_img"],
                      iou_threshold=cfg["nms"]["iou_threshold"],
                      min_bbox_size=cfg["min_bbox_size"])
    return maps, props

  def rpn_proposals(self, images: jax.Array, image_shapes: jax.Array | None = None
                    ) -> dict[str, jax.Array]:
    """``{"boxes" [N, R, 4], "scores" [N, R], "num" [N]}``, ``R`` the test
    configuration's ``rpn.max_per_img``; the real proposals first, by score."""
    return self._rpn(images, self._image_shapes(images, image_shapes))[1]

  def loss(self, images: jax.Array, targets: dict[str, jax.Array],
           samples: dict[str, jax.Array] | None = None, *, key: jax.Array | None = None,
           image_shapes: jax.Array | None = None) -> dict[str, jax.Array]:
    """mmdet's five training losses (``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_cls``,
    ``loss_bbox``, ``loss_mask``), each averaged over the whole batch as mmdet does.

    ``targets``: ``boxes [N, G, 4]``, ``labels [N, G]``, ``masks [N, G, H, W]`` (0/1 at
    the input size) and ``num [N]`` (real ground truths first). The RPN's and the RoI
    head's samples are drawn with ``key`` (``RandomSampler``; one key, or one per image
    ``[N]``), or given as ``samples``:
    index arrays ``rpn_pos``, ``rpn_neg`` (into all anchors, levels concatenated),
    ``rcnn_pos``, ``rcnn_neg`` (into the ground truths followed by the training
    proposals), each ``[N, n]`` with -1 as padding.
    """
    return detector_loss(self, images, targets, samples, key=key, image_shapes=image_shapes)

  def detections(self, images: jax.Array, image_shapes: jax.Array | None = None, *,
                 original_shapes: jax.Array | None = None) -> dict[str, jax.Array]:
    """The detections before their masks are pasted: ``boxes``, ``scores``, ``labels``,
    ``num`` as ``__call__``'s, and ``mask_probs [N, K, M, M]`` (float32), the mask
    head's probabilities of each detection's own class, to paste into its box
    (``paste_masks``). ``original_shapes``: see ``__call__``."""
    image_shapes = self._image_shapes(images, image_shapes)
    maps, props = self._rpn(images, image_shapes)
    cfg = self.test_cfg["rcnn"]
    head = self.roi_head
    rescale = original_shapes is not None
    originals = jnp.asarray(original_shapes, jnp.float32) if rescale else image_shapes

    def one_image(maps, boxes, num, image_shape, original_shape):
      # mmcv's scale factors: new size / old size, per axis (w, h); 1 for an empty
      # (padding) image rather than 0 / 0.
      scale = (jnp.where(original_shape[::-1] > 0, image_shape[::-1].astype(jnp.float32)
                         / jnp.maximum(original_shape[::-1], 1), 1.0) if rescale else None)
      logits, deltas = head.bbox_head(head.rois(maps, boxes, "bbox_roi_extractor"))
      dets = detect(boxes, num, logits, deltas, image_shape, score_thr=cfg["score_thr"],
                    iou_threshold=cfg["nms"]["iou_threshold"],
                    max_per_img=cfg["max_per_img"], scale=scale)
      # The mask RoIs are the boxes at the network's input size.
      rois = dets["boxes"] if scale is None else dets["boxes"] * jnp.tile(scale, 2)
      mask_logits = head.mask_head(head.rois(maps, rois, "mask_roi_extractor"))
      own = jnp.take_along_axis(mask_logits, dets["labels"][:, None, None, None], axis=-1)
      return {**dets, "mask_probs": jax.nn.sigmoid(own[..., 0].astype(jnp.float32))}

    # vmap, not a loop over the images: the batch may be sharded over devices, and a
    # loop over a sharded axis would gather every image onto every device.
    return jax.vmap(one_image)(maps, props["boxes"], props["num"], image_shapes, originals)

  def __call__(self, images: jax.Array, image_shapes: jax.Array | None = None, *,
               original_shapes: jax.Array | None = None,
               mask_shape: tuple[int, int] | None = None) -> dict[str, jax.Array]:
    """Detections: ``boxes [N, K, 4]``, ``scores [N, K]``, ``labels [N, K]``, ``masks
    [N, K, H, W]`` (bool) and ``num [N]``, ``K`` the test configuration's
    ``rcnn.max_per_img``: the real detections first, by score, padding zero.
    ``image_shapes [N, 2]`` gives each image's unpadded ``(height, width)`` (default: the
    input size); boxes are clipped to it and masks are empty beyond it.

    ``original_shapes [N, 2]``: the ``(height, width)`` each image had before it was
    resized to ``image_shapes`` (mmdet's ``rescale=True``): boxes come back in the
    original images' coordinates (divided by the resize factors before the NMS) and
    masks are pasted at the original size, on a ``mask_shape`` canvas (static; default:
    the input size) that must hold every original image.
    """
    image_shapes = self._image_shapes(images, image_shapes)
    dets = self.detections(images, image_shapes, original_shapes=original_shapes)
    outer = image_shapes if original_shapes is None else jnp.asarray(original_shapes)
    height, width = mask_shape or images.shape[1:3]
    cfg = self.test_cfg["rcnn"]

    def paste(probs, boxes, num, shape):
      inside = ((jnp.arange(height) < shape[0])[:, None]
                & (jnp.arange(width) < shape[1])[None, :])
      real = jnp.arange(cfg["max_per_img"]) < num
      pasted = paste_masks(probs, boxes, height, width) >= cfg["mask_thr_binary"]
      return pasted & inside & real[:, None, None]

    masks = jax.vmap(paste)(dets.pop("mask_probs"), dets["boxes"], dets["num"], outer)
    return {**dets, "masks": masks}


def create_detector(name: str = "mask_rcnn_internimage_t", *, num_classes: int = 80,
                    rngs: nnx.Rngs | None = None, pretrained: Any = None,
                    backbone: Mapping[str, Any] | None = None,
                    neck: Mapping[str, Any] | None = None,
                    rpn_head: Mapping[str, Any] | None = None,
                    roi_head: Mapping[str, Any] | None = None,
                    test_cfg: Mapping[str, Any] | None = None,
                    train_cfg: Mapping[str, Any] | None = None, dtype: Dtype = None,
                    param_dtype: Dtype = jnp.float32) -> MaskRCNN:
  """Builds an official Mask R-CNN (``"mask_rcnn_internimage_t"``, ``_s``, ``_b``).

  ``backbone`` overrides :class:`InternImage`'s options; ``neck``, ``rpn_head``,
  ``roi_head``, ``test_cfg`` and ``train_cfg`` (the losses' samplers and training
  proposals) take mmdet's own config keys (without ``type``), merged
  recursively into the official configuration, e.g. ``roi_head=dict(bbox_roi_extractor=
  dict(finest_scale=16), bbox_head=dict(fc_out_channels=64))``. The neck's input channels
  follow the backbone, and the heads' input channels the neck, unless given.

  ``pretrained`` (a str or ``os.PathLike``) loads a whole Mask R-CNN checkpoint, strictly
  (``num_classes`` and the options must be the checkpoint's): a published COCO one by tag
  (``"coco_1x"``, ``"coco_3x"``: 80 classes; ``internimage_jax.pretrained.PUBLISHED``) or
  a path (mmdet ``.pth``, ``.safetensors``, converted directory).
  """
  if name not in DETECTORS:
    raise ValueError(f"unknown detector {name!r}; choose one of {sorted(DETECTORS)}")
  if pretrained is not None:
    from internimage_jax import pretrained as hub

    entry = hub.entry_of(pretrained, name.removeprefix("mask_rcnn_"))
    if entry is not None and entry.holds != "detector":  # refused before any download
      raise ValueError(f"create_detector: pretrained {pretrained!r} is a {entry.holds}'s "
                       f"checkpoint ({entry.filename}); the Mask R-CNN's are "
                       f"{hub.tags_holding(name.removeprefix('mask_rcnn_'), 'detector')}")
  for option in ("num_classes", "use_clip_projector", "features_only"):
    if option in (backbone or {}):
      raise ValueError(f"create_detector: {option} is not an option of the detection "
                       "backbone (it has no classification head)")
  options = {**DETECTORS[name], **(backbone or {})}
  # Every configuration is checked before anything is built.
  neck_cfg = merge({**NECK, "in_channels": [options["channels"] << i for i in range(4)]},
                   neck, "neck")
  width = neck_cfg["out_channels"]
  rpn_cfg = merge({**RPN_HEAD, "in_channels": width, "feat_channels": width}, rpn_head,
                  "rpn_head")
  roi_base = copy.deepcopy(ROI_HEAD)
  for part in ("bbox_roi_extractor", "mask_roi_extractor"):
    roi_base[part]["out_channels"] = width
  for part in ("bbox_head", "mask_head"):
    roi_base[part]["in_channels"] = width
  roi_cfg = merge(roi_base, roi_head, "roi_head")
  test = merge(TEST_CFG, test_cfg, "test_cfg")
  train = merge(TRAIN_CFG, train_cfg, "train_cfg")
  for stage in ("rpn", "rcnn"):
    sampler = train[stage]["sampler"]
    if sampler["num"] < 1 or not 0 < sampler["pos_fraction"] <= 1:
      raise ValueError(f"create_detector: train_cfg.{stage}.sampler needs num >= 1 and "
                       f"0 < pos_fraction <= 1, got {sampler}")
  if train["rpn_proposal"]["max_per_img"] < 1:
    raise ValueError("create_detector: train_cfg.rpn_proposal.max_per_img must be positive")
  for part, head in (("bbox_roi_extractor", "bbox_head"), ("mask_roi_extractor", "mask_head")):
    if roi_cfg[part]["out_channels"] != roi_cfg[head]["in_channels"]:
      raise ValueError(f"create_detector: roi_head.{part}.out_channels "
                       f"({roi_cfg[part]['out_channels']}) must equal roi_head.{head}."
                       f"in_channels ({roi_cfg[head]['in_channels']})")
  size = roi_cfg["bbox_roi_extractor"]["roi_layer"]["output_size"]
  if roi_cfg["bbox_head"]["roi_feat_size"] != size:
    raise ValueError(f"create_detector: roi_head.bbox_head.roi_feat_size "
                     f"({roi_cfg['bbox_head']['roi_feat_size']}) must equal the box RoI "
                     f"extractor's roi_layer.output_size ({size})")
  for stage, key in (("rpn", "max_per_img"), ("rcnn", "max_per_img")):
    if test[stage][key] < 1:
      raise ValueError(f"create_detector: test_cfg.{stage}.{key} must be positive (it is "
                       f"the number of output slots), got {test[stage][key]}")
  anchors = rpn_cfg["anchor_generator"]
  if len(anchors["strides"]) != neck_cfg["num_outs"]:
    raise ValueError(f"create_detector: rpn_head.anchor_generator.strides has "
                     f"{len(anchors['strides'])} levels, the neck {neck_cfg['num_outs']}")
  if list(anchors["scales"]) != [8] or list(anchors["ratios"]) != [0.5, 1.0, 2.0]:
    raise ValueError("create_detector: only the official anchors (scales [8], ratios "
                     "[0.5, 1.0, 2.0]) are supported")
  if pretrained is not None:  # downloaded (once) before a network is built
    path, _ = hub.resolve(pretrained, name.removeprefix("mask_rcnn_"))
    if not path.exists():
      raise FileNotFoundError(f"create_detector: checkpoint not found: {path}")
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  net = InternImage(features_only=True, num_classes=0, **common, **options)
  fpn = FPN(neck_cfg["in_channels"], neck_cfg["out_channels"], neck_cfg["num_outs"], **common)
  rpn = RPNHead(rpn_cfg["in_channels"], rpn_cfg["feat_channels"], num_anchors=3, **common)
  heads = RoIHead(roi_cfg, num_classes, **common)
  det = MaskRCNN(net, fpn, rpn, heads, anchor_strides=anchors["strides"], test_cfg=test,
                 train_cfg=train)
  if pretrained is not None:
    from internimage_jax import convert

    convert.load_checkpoint(det, path)  # strict: every key, no extra, every shape
  return det


def detector_loss(det: MaskRCNN, images: jax.Array, targets: dict[str, jax.Array],
                  samples: dict[str, jax.Array] | None = None, *, key: jax.Array | None = None,
                  image_shapes: jax.Array | None = None) -> dict[str, jax.Array]:
  """mmdet's five Mask R-CNN losses for a batch (spec section 10); see ``MaskRCNN.loss``."""
  from internimage_jax.models.detection import losses
  from internimage_jax.models.detection.boxes import anchors as level_anchors

  if (samples is None) == (key is None):
    raise ValueError("MaskRCNN.loss: pass either key (random sampling) or samples (fixed)")
  for name in ("boxes", "labels", "masks", "num"):
    if name not in targets:
      raise ValueError(f"MaskRCNN.loss: targets need {name!r} (boxes [N, G, 4], labels "
                       "[N, G], masks [N, G, H, W], num [N])")
  image_shapes = det._image_shapes(images, image_shapes)
  batch = images.shape[0]
  maps = det.neck(det.backbone.forward_features(images))
  logits, deltas = det.rpn_head(maps)
  train = det.train_cfg
  cfg = train["rpn_proposal"]
  props = proposals([jax.lax.stop_gradient(x) for x in logits],
                    [jax.lax.stop_gradient(x) for x in deltas], det.anchor_strides,
                    image_shapes, nms_pre=cfg["nms_pre"], max_per_img=cfg["max_per_img"],
                    iou_threshold=cfg["nms"]["iou_threshold"],
                    min_bbox_size=cfg["min_bbox_size"])
  priors = jnp.concatenate([jnp.asarray(level_anchors(x.shape[1:3], s, dtype=jnp.float32))
                            for x, s in zip(logits, det.anchor_strides)])
  flat_logits = jnp.concatenate([x.reshape(batch, -1) for x in logits], axis=1)
  flat_deltas = jnp.concatenate([x.reshape(batch, -1, 4) for x in deltas], axis=1)
  rpn_sampler, rcnn_sampler = train["rpn"]["sampler"], train["rcnn"]["sampler"]
  head = det.roi_head
  classes = head.bbox_head.num_classes
  mask_slots = int(rcnn_sampler["num"] * rcnn_sampler["pos_fraction"])  # positives at most
  if key is None:
    keys = jnp.zeros((batch,), jnp.uint32)  # unused with fixed samples
  elif not jax.dtypes.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
    raise ValueError("MaskRCNN.loss: key must be a typed key (jax.random.key), or one per "
                     f"image [N]; got {jnp.asarray(key).dtype} {jnp.shape(key)}")
  elif jnp.shape(key) == (batch,):  # one key per image (so micro-batches sample as the batch)
    keys = key
  elif jnp.shape(key) == ():
    keys = jax.random.split(key, batch)
  else:
    raise ValueError(f"MaskRCNN.loss: key must be one key or one per image [{batch}], got "
                     f"shape {jnp.shape(key)}")

  def one_image(args):
    (maps_i, logit, delta, boxes, num, gt, labels, masks, num_gt, shape, key_i,
     fixed) = args
    gt_valid = jnp.arange(gt.shape[0]) < num_gt
    a = priors.shape[0]
    assigned = losses.assign(priors, gt, gt_valid, losses.RPN_ASSIGNER)
    if fixed is None:
      rpn_key, rcnn_key = jax.random.split(key_i)
      pos, neg = losses.sample(rpn_key, assigned, rpn_sampler["num"],
                               rpn_sampler["pos_fraction"])
    else:
      pos = losses.from_indices(a, fixed["rpn_pos"])
      neg = losses.from_indices(a, fixed["rpn_neg"])
    rpn = losses.rpn_terms(logit, delta, priors, gt, assigned, pos, neg)
    # The RoI head's candidates: the ground truths first (add_gt_as_proposals), then the
    # training proposals.
    candidates = jnp.concatenate([gt.astype(boxes.dtype), boxes])
    valid = jnp.concatenate([gt_valid, jnp.arange(boxes.shape[0]) < num])
    assigned = jnp.where(valid, losses.assign(candidates, gt, gt_valid,
                                              losses.RCNN_ASSIGNER), -1)
    if fixed is None:
      pos, neg = losses.sample(rcnn_key, assigned, rcnn_sampler["num"],
                               rcnn_sampler["pos_fraction"], valid)
    else:
      size = candidates.shape[0]
      pos = losses.from_indices(size, fixed["rcnn_pos"])
      neg = losses.from_indices(size, fixed["rcnn_neg"])
    # Sampled RoIs in fixed slots: the positives, then the negatives, then padding.
    slots = rcnn_sampler["num"]
    order = jnp.argsort(jnp.where(pos, 0, jnp.where(neg, 1, 2)), stable=True)[:slots]
    taken = jnp.arange(slots) < jnp.sum(pos | neg)
    positive = jnp.arange(slots) < jnp.sum(pos)
    rois, assigned = candidates[order], assigned[order]
    roi_labels, roi_targets = losses.rcnn_targets(rois, gt, labels, assigned, positive, classes)
    cls, reg = head.bbox_head(head.rois(maps_i, rois, "bbox_roi_extractor"))
    rcnn = losses.rcnn_terms(cls, reg, roi_labels, roi_targets, positive, taken)
    pos_rois, mask_pos = rois[:mask_slots], positive[:mask_slots]
    gt_index = jnp.maximum(assigned[:mask_slots] - 1, 0)
    mask_targets = losses.mask_targets(masks, pos_rois, gt_index, shape,
                                       size=train["rcnn"]["mask_size"])
    mask_logits = head.mask_head(head.rois(maps_i, pos_rois, "mask_roi_extractor"))
    own = jnp.take_along_axis(mask_logits, jnp.minimum(roi_labels[:mask_slots], classes - 1)
                              [:, None, None, None], axis=-1)[..., 0]
    mask = losses.mask_terms(own, mask_targets, mask_pos)
    return (*rpn, *rcnn, *mask)

  fixed = None
  if samples is not None:
    fixed = {k: jnp.asarray(samples[k]) for k in ("rpn_pos", "rpn_neg", "rcnn_pos", "rcnn_neg")}
  args = (maps, flat_logits, flat_deltas, props["boxes"], props["num"],
          jnp.asarray(targets["boxes"]), jnp.asarray(targets["labels"]),
          jnp.asarray(targets["masks"]), jnp.asarray(targets["num"]), image_shapes, keys, fixed)
  # vmap, not lax.map: XLA:CPU runs the gradient of a convolution inside a loop ~12x
  # slower than batched (the mask head's), and training holds every image's activations
  # for the backward pass anyway.
  (rpn_cls, rpn_bbox, rpn_count, cls, bbox, rcnn_count, mask, mask_count) = (
      jnp.sum(t) for t in jax.vmap(one_image)(args))
  eps = losses.EPS
  return {"loss_rpn_cls": rpn_cls / (rpn_count + eps),
          "loss_rpn_bbox": rpn_bbox / (rpn_count + eps),
          "loss_cls": cls / (rcnn_count + eps), "loss_bbox": bbox / (rcnn_count + eps),
          "loss_mask": mask / jnp.maximum(mask_count, 1)}
