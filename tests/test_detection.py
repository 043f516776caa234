"""Mask R-CNN pieces against mmdetection's goldens (``det_mini_t``, spec ``detection.md``):
anchors, the box coder, the FPN neck, the RPN head and its proposals, in float64 at the
golden README's tolerances and in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (
    TOL_X64, assert_rel_close, load_golden, params_of, precision, require_golden)
from internimage_jax.models import detection

STRIDES = (4, 8, 16, 32, 64)
TOL64 = 1e-12


@pytest.fixture(scope="module")
def golden():
  return load_golden("det_mini_t")


def _nhwc(a: np.ndarray) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1))


def _set_conv(module: nnx.Conv, params: dict, name: str, dtype) -> None:
  """A PyTorch ``[out, in, kh, kw]`` convolution (and its bias) into ``module``."""
  module.kernel[...] = jnp.asarray(np.transpose(params[f"{name}.weight"], (2, 3, 1, 0)), dtype)
  module.bias[...] = jnp.asarray(params[f"{name}.bias"], dtype)


def _fpn(golden, dtype) -> detection.FPN:
  params = params_of(golden)
  fpn = detection.FPN([16, 32, 64, 128], 32, 5, dtype=dtype, param_dtype=dtype,
                      rngs=nnx.Rngs(0))
  for i in range(4):
    _set_conv(fpn.lateral_convs[i].conv, params, f"neck.lateral_convs.{i}.conv", dtype)
    _set_conv(fpn.fpn_convs[i].conv, params, f"neck.fpn_convs.{i}.conv", dtype)
  return fpn


def _rpn_head(golden, dtype) -> detection.RPNHead:
  params = params_of(golden)
  head = detection.RPNHead(32, 32, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  for name in ("rpn_conv", "rpn_cls", "rpn_reg"):
    _set_conv(getattr(head, name), params, f"rpn_head.{name}", dtype)
  return head


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_anchors_match_mmdet(golden, dtype):
  for level, stride in enumerate(STRIDES):
    size = golden[f"rpn_cls{level}_nchw"].shape[2:]
    got = detection.anchors(size, stride, dtype=dtype)
    assert got.dtype == dtype
    # float64 is exact; float32 rounds sqrt(0.5) and its products as the original does.
    np.testing.assert_allclose(got, golden[f"anchors{level}"], rtol=0 if dtype == np.float64
                               else 1e-7, atol=0 if dtype == np.float64 else 1e-5)


def test_box_coder_matches_mmdet(golden):
  h, w = golden["input_nchw"].shape[2:]
  with precision(np.float64):
    rois, deltas = jnp.asarray(golden["coder_rois"]), jnp.asarray(golden["coder_deltas"])
    assert np.abs(golden["coder_deltas"][:, 2:]).max() > 4.2  # the clamp is exercised
    for stds, name in ((detection.boxes.RCNN_STDS, "rcnn"), (detection.boxes.RPN_STDS, "rpn")):
      got = detection.decode(rois, deltas, (h, w), stds)
      np.testing.assert_allclose(got, golden[f"coder_decoded_{name}"], rtol=TOL64, atol=TOL64)
    encoded = detection.encode(rois, jnp.asarray(golden["coder_gt"]))
    assert encoded.dtype == jnp.float32  # mmdet's regression targets are float32
    np.testing.assert_allclose(encoded, golden["coder_encoded_rcnn"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fpn_and_rpn_head_match_mmdet(golden, dtype):
  tol = TOL64 * 1e2 if dtype == np.float64 else 1e-5
  with precision(dtype):
    features = [jnp.asarray(_nhwc(golden[f"backbone{i}_nchw"]), dtype) for i in range(4)]
    maps = _fpn(golden, dtype)(features)
    assert len(maps) == 5
    for level, p in enumerate(maps):
      assert_rel_close(p, _nhwc(golden[f"fpn{level}_nchw"]), tol, f"P{level + 2}")
    logits, deltas = _rpn_head(golden, dtype)(
        [jnp.asarray(_nhwc(golden[f"fpn{i}_nchw"]), dtype) for i in range(5)])
    for level in range(5):
      assert_rel_close(logits[level], _nhwc(golden[f"rpn_cls{level}_nchw"]), tol, "cls")
      assert_rel_close(deltas[level], _nhwc(golden[f"rpn_reg{level}_nchw"]), tol, "reg")


def _rpn_outputs(golden, dtype, copies: int = 1):
  logits = [jnp.asarray(np.repeat(_nhwc(golden[f"rpn_cls{i}_nchw"]), copies, 0), dtype)
            for i in range(5)]
  deltas = [jnp.asarray(np.repeat(_nhwc(golden[f"rpn_reg{i}_nchw"]), copies, 0), dtype)
            for i in range(5)]
  return logits, deltas


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("mode", ["test", "train"])
def test_proposals_match_mmdet(golden, dtype, mode):
  """Test (nms_pre 1000) and training (nms_pre 2000) proposals: the same boxes in the
  same order; float32 makes the same NMS decisions (spec section 6)."""
  h, w = golden["input_nchw"].shape[2:]
  nms_pre, name = (1000, "proposal") if mode == "test" else (2000, "train_proposal")
  want_boxes = golden["proposals" if mode == "test" else "train_proposals"]
  want_scores = golden[f"{name}_scores"]
  tol = TOL64 if dtype == np.float64 else 2e-6
  with precision(dtype):
    logits, deltas = _rpn_outputs(golden, dtype, copies=2)
    run = jax.jit(lambda l, d, s: detection.proposals(l, d, STRIDES, s, nms_pre=nms_pre,
                                                      max_per_img=1000))
    out = run(logits, deltas, jnp.asarray([[h, w], [h, w]]))
  n = len(want_boxes)
  for image in range(2):  # vmapped over the batch
    assert int(out["num"][image]) == n
    np.testing.assert_allclose(out["boxes"][image, :n], want_boxes, rtol=tol, atol=tol * 128)
    np.testing.assert_allclose(out["scores"][image, :n], want_scores, rtol=tol, atol=tol)
    assert not np.any(out["boxes"][image, n:]) and not np.any(out["scores"][image, n:])


def test_proposals_clip_to_each_image_and_pad():
  """A smaller image in the batch clips its boxes to its own size; fewer survivors than
  slots leave zero padding after ``num``."""
  rng = np.random.default_rng(0)
  logits = [jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32) for s in (8, 4, 2, 1, 1)]
  deltas = [jnp.asarray(rng.normal(size=(2, s, s, 12)), jnp.float32) for s in (8, 4, 2, 1, 1)]
  out = detection.proposals(logits, deltas, STRIDES, jnp.asarray([[32, 32], [20, 12]]),
                            nms_pre=50, max_per_img=300)
  num = np.asarray(out["num"])
  assert 0 < num[0] < 300 and 0 < num[1] < 300
  boxes = np.asarray(out["boxes"])
  assert boxes[1, :num[1], 0::2].max() <= 12 and boxes[1, :num[1], 1::2].max() <= 20
  assert boxes[0, :num[0]].max() <= 32 and boxes[0, :num[0]].max() > 20
  scores = np.asarray(out["scores"])
  assert np.all(np.diff(scores[0, :num[0]]) <= 0)  # descending
  assert not boxes[0, num[0]:].any() and not scores[1, num[1]:].any()


def _set_linear(module: nnx.Linear, params: dict, name: str, dtype) -> None:
  module.kernel[...] = jnp.asarray(params[f"{name}.weight"].T, dtype)
  module.bias[...] = jnp.asarray(params[f"{name}.bias"], dtype)


def _roi_heads(golden, dtype):
  params = params_of(golden)
  kw = dict(dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
  box = detection.Shared2FCBBoxHead(32, 3, fc_out_channels=64, **kw)
  for i in range(2):
    _set_linear(box.shared_fcs[i], params, f"roi_head.bbox_head.shared_fcs.{i}", dtype)
  _set_linear(box.fc_cls, params, "roi_head.bbox_head.fc_cls", dtype)
  _set_linear(box.fc_reg, params, "roi_head.bbox_head.fc_reg", dtype)
  mask = detection.FCNMaskHead(32, 3, conv_out_channels=32, **kw)
  for i in range(4):
    _set_conv(mask.convs[i].conv, params, f"roi_head.mask_head.convs.{i}.conv", dtype)
  mask.upsample.weight[...] = jnp.asarray(params["roi_head.mask_head.upsample.weight"], dtype)
  mask.upsample.bias[...] = jnp.asarray(params["roi_head.mask_head.upsample.bias"], dtype)
  _set_conv(mask.conv_logits, params, "roi_head.mask_head.conv_logits", dtype)
  return box, mask


def test_roi_heads_and_detections_match_mmdet(golden):
  """From the golden FPN maps and proposals: RoI levels and features, box-head outputs,
  decoded boxes, the 100 detections, mask features and logits (float64), and the pasted
  probabilities and binary masks (float32, as mmdet pastes)."""
  finest_scale = 16  # the goldens' (official 56), so that the tiny image uses all levels
  h, w = golden["input_nchw"].shape[2:]
  proposals = golden["proposals"]
  with precision(np.float64):
    maps = [jnp.asarray(_nhwc(golden[f"fpn{i}_nchw"])[0]) for i in range(4)]
    levels = detection.roi_levels(jnp.asarray(proposals), finest_scale)
    np.testing.assert_array_equal(levels, golden["roi_levels"])
    assert set(np.asarray(levels).tolist()) == {0, 1, 2}  # the tiny image reaches P4
    rois = detection.extract_rois(maps, jnp.asarray(proposals), STRIDES[:4], 7, finest_scale)
    assert_rel_close(jnp.transpose(rois[:48], (0, 3, 1, 2)), golden["bbox_roi_feats_first"],
                     TOL64, "bbox RoI features")
    box_head, mask_head = _roi_heads(golden, np.float64)
    logits, deltas = box_head(rois)
    assert_rel_close(logits, golden["bbox_cls_score"], TOL64, "class logits")
    assert_rel_close(deltas, golden["bbox_pred"], TOL64, "deltas")
    n = len(proposals)
    slots = 1000  # proposals arrive in fixed slots; the padding must not matter
    padded = lambda a: jnp.pad(jnp.asarray(a), [(0, slots - n)] + [(0, 0)] * (a.ndim - 1))
    dets = jax.jit(detection.detect)(padded(proposals), n, padded(np.asarray(logits)),
                                     padded(np.asarray(deltas)), jnp.asarray([h, w]))
    k = len(golden["det_scores"])
    assert int(dets["num"]) == k
    np.testing.assert_allclose(dets["boxes"][:k], golden["det_bboxes"], rtol=TOL64, atol=1e-10)
    np.testing.assert_allclose(dets["scores"][:k], golden["det_scores"], rtol=TOL64, atol=0)
    np.testing.assert_array_equal(dets["labels"][:k], golden["det_labels"])
    mask_rois = detection.extract_rois(maps, dets["boxes"][:k], STRIDES[:4], 14, finest_scale)
    assert_rel_close(jnp.transpose(mask_rois[:12], (0, 3, 1, 2)),
                     golden["mask_roi_feats_first"], TOL64, "mask RoI features")
    mask_logits = mask_head(mask_rois)  # [K, 28, 28, classes]
    own = jnp.take_along_axis(mask_logits, dets["labels"][:k, None, None, None], axis=-1)[..., 0]
    assert_rel_close(own, golden["mask_logits"], TOL64, "mask logits")
  probs = detection.paste_masks(jax.nn.sigmoid(jnp.asarray(golden["mask_logits"], jnp.float32)),
                                jnp.asarray(golden["det_bboxes"], jnp.float32), h, w)
  assert probs.dtype == jnp.float32
  np.testing.assert_allclose(probs[:12], golden["mask_probs_first"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(probs >= 0.5, golden["det_masks"])


def _mini_detector(dtype=jnp.float32):
  """``det_mini_t``'s configuration (index_det.json) through create_detector's options."""
  return detection.create_detector(
      "mask_rcnn_internimage_t", num_classes=3, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=dtype,
      backbone=dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), drop_path_rate=0.0),
      neck=dict(out_channels=32),  # the heads' input channels follow
      roi_head=dict(bbox_roi_extractor=dict(finest_scale=16),
                    bbox_head=dict(fc_out_channels=64),
                    mask_roi_extractor=dict(finest_scale=16),
                    mask_head=dict(conv_out_channels=32)))


def test_detector_from_the_mmdet_checkpoint_matches_end_to_end(golden):
  """The golden ``.pth`` (mmdet's key layout) loads strictly; from the image, the FPN
  maps, proposals, detections and binary masks are mmdet's (float64)."""
  import torch

  from internimage_jax import convert

  h, w = golden["input_nchw"].shape[2:]
  with precision(np.float64):
    det = _mini_detector(jnp.float64)
    state = torch.load(require_golden() / "det_mini_t.pth", map_location="cpu",
                       weights_only=False)
    convert.load_state_dict(det, state)  # strict: every key, no extra
    assert sorted(convert.to_state_dict(det)) == sorted(state["state_dict"])
    images = jnp.asarray(_nhwc(golden["input_nchw"]))
    props = det.rpn_proposals(images)
    n = len(golden["proposals"])
    assert int(props["num"][0]) == n  # the same NMS decisions
    # The original's backbone carries float32 grid noise (golden README): network tolerance.
    assert_rel_close(props["boxes"][0, :n], golden["proposals"], TOL_X64, "proposals")
    out = nnx.jit(lambda m, x: m(x))(det, images)
  k = len(golden["det_scores"])
  assert int(out["num"][0]) == k and out["masks"].shape == (1, 100, h, w)
  assert_rel_close(out["boxes"][0, :k], golden["det_bboxes"], TOL_X64, "boxes")
  assert_rel_close(out["scores"][0, :k], golden["det_scores"], TOL_X64, "scores")
  np.testing.assert_array_equal(out["labels"][0, :k], golden["det_labels"])
  np.testing.assert_array_equal(out["masks"][0, :k], golden["det_masks"])


def test_create_detector_errors():
  for kwargs, message in (
      (dict(roi_head=dict(bbox_head=dict(fc_channels=64))),
       "unknown option roi_head.bbox_head.fc_channels"),
      (dict(test_cfg=dict(rcnn=0.5)), "test_cfg.rcnn must be a dict"),
      (dict(backbone=dict(num_classes=3)), "num_classes is not an option"),
      (dict(rpn_head=dict(anchor_generator=dict(ratios=[1.0]))), "only the official anchors"),
      (dict(roi_head=dict(bbox_head=dict(roi_feat_size=5))), "must equal the box RoI"),
      (dict(roi_head=dict(mask_head=dict(in_channels=128))),
       "mask_roi_extractor.out_channels \\(256\\) must equal roi_head.mask_head.in_channels"),
      (dict(test_cfg=dict(rcnn=dict(max_per_img=0))), "test_cfg.rcnn.max_per_img must be"),
  ):
    with pytest.raises(ValueError, match=message):
      detection.create_detector(**kwargs)
  with pytest.raises(ValueError, match="unknown detector 'mask_rcnn_internimage_l'"):
    detection.create_detector("mask_rcnn_internimage_l")


def test_training_targets_and_losses_match_mmdet(golden):
  """From the goldens' own tensors and saved sampler picks: the RPN and RoI assignments,
  labels, regression and mask targets, and the five losses (spec section 10)."""
  from internimage_jax.models.detection import losses

  h, w = golden["input_nchw"].shape[2:]
  with precision(np.float64):
    gt = jnp.asarray(golden["gt_bboxes"])
    valid = jnp.ones(gt.shape[:1], bool)
    anchors = jnp.asarray(np.concatenate([golden[f"anchors{i}"] for i in range(5)]))
    assigned = losses.assign(anchors, gt, valid, losses.RPN_ASSIGNER)
    np.testing.assert_array_equal(assigned, golden["rpn_assigned_gt_inds"])
    a = len(anchors)
    pos = losses.from_indices(a, jnp.asarray(golden["rpn_pos_inds"]))
    neg = losses.from_indices(a, jnp.asarray(golden["rpn_neg_inds"]))
    logits = jnp.concatenate([jnp.asarray(_nhwc(golden[f"rpn_cls{i}_nchw"])[0]).reshape(-1)
                              for i in range(5)])
    deltas = jnp.concatenate([jnp.asarray(_nhwc(golden[f"rpn_reg{i}_nchw"])[0]).reshape(-1, 4)
                              for i in range(5)])
    rpn = losses.rpn_losses(logits, deltas, anchors, gt, assigned, pos, neg)
    np.testing.assert_allclose(rpn["loss_rpn_cls"], golden["loss_rpn_cls"], rtol=1e-6)
    np.testing.assert_allclose(rpn["loss_rpn_bbox"], golden["loss_rpn_bbox"], rtol=1e-6)

    candidates = jnp.concatenate([gt, jnp.asarray(golden["train_proposals"])])
    assigned = losses.assign(candidates, gt, valid, losses.RCNN_ASSIGNER)
    np.testing.assert_array_equal(assigned, golden["rcnn_assigned_gt_inds"])
    order = jnp.asarray(np.concatenate([golden["rcnn_pos_inds"], golden["rcnn_neg_inds"]]))
    rois, assigned_s = candidates[order], assigned[order]
    npos = len(golden["rcnn_pos_inds"])
    pos = jnp.arange(len(order)) < npos
    np.testing.assert_allclose(rois, golden["rcnn_sampled_rois"], rtol=0, atol=0)
    labels, targets = losses.rcnn_targets(rois, gt, jnp.asarray(golden["gt_labels"]),
                                          assigned_s, pos, num_classes=3)
    np.testing.assert_array_equal(labels, golden["rcnn_labels"])
    np.testing.assert_allclose(targets, golden["rcnn_bbox_targets"], rtol=1e-6, atol=1e-6)
    rcnn = losses.rcnn_losses(jnp.asarray(golden["rcnn_cls_score_sampled"]),
                              jnp.asarray(golden["rcnn_bbox_pred_sampled"]), labels,
                              targets, pos, jnp.ones_like(pos))
    np.testing.assert_allclose(rcnn["loss_cls"], golden["loss_cls"], rtol=1e-12)
    np.testing.assert_allclose(rcnn["loss_bbox"], golden["loss_bbox"], rtol=1e-6)
    gt_index = assigned_s[:npos] - 1
    np.testing.assert_array_equal(gt_index, golden["rcnn_pos_assigned_gt_inds"])
    masks = losses.mask_targets(jnp.asarray(golden["gt_masks"]), rois[:npos], gt_index,
                                jnp.asarray([h, w]))
    np.testing.assert_array_equal(masks, golden["rcnn_mask_targets"])
    mask_logits = jnp.asarray(golden["rcnn_mask_logits_pos"])
    loss_mask = losses.mask_loss(mask_logits, masks, jnp.ones((npos,), bool))
    np.testing.assert_allclose(loss_mask, golden["loss_mask_f64"], rtol=1e-12)
    np.testing.assert_allclose(loss_mask, golden["loss_mask"], rtol=1e-6)


def test_random_sampler_takes_the_configured_counts():
  from internimage_jax.models.detection import losses

  assigned = jnp.asarray(np.r_[np.full(300, 1), np.full(50, -1), np.full(1000, 0)])
  padding = jnp.arange(len(assigned)) < 1300  # the last 50 negatives are padding
  pos, neg = losses.sample(jax.random.key(0), assigned, 256, 0.5, padding)
  assert int(pos.sum()) == 128 and int(neg.sum()) == 128
  assert not np.any(np.asarray(pos)[300:]) and not np.any(np.asarray(neg)[:350])
  assert not np.any(np.asarray(neg)[1300:])
  few = jnp.asarray(np.r_[np.full(5, 2), np.full(20, 0)])
  pos, neg = losses.sample(jax.random.key(1), few, 256, 0.5)
  assert int(pos.sum()) == 5 and int(neg.sum()) == 20  # fewer candidates than slots
  other, _ = losses.sample(jax.random.key(2), assigned, 256, 0.5, padding)
  assert np.any(np.asarray(other) != np.asarray(losses.sample(
      jax.random.key(0), assigned, 256, 0.5, padding)[0]))  # the key decides


def test_detector_losses_from_the_image_match_mmdet(golden):
  """``det.loss`` from the image with the goldens' saved sampler picks gives mmdet's five
  losses (network tolerance: the original backbone's float32 grid noise); with a key
  instead it samples, and every loss is finite and has a gradient."""
  import torch

  from internimage_jax import convert

  with precision(np.float64):
    det = _mini_detector(jnp.float64)
    convert.load_state_dict(det, torch.load(require_golden() / "det_mini_t.pth",
                                            map_location="cpu", weights_only=False))
    images = jnp.asarray(_nhwc(golden["input_nchw"]))
    targets = {"boxes": golden["gt_bboxes"][None], "labels": golden["gt_labels"][None],
               "masks": golden["gt_masks"][None], "num": np.asarray([3])}
    samples = {k: golden[f"{k}_inds"][None] for k in ("rpn_pos", "rpn_neg", "rcnn_pos",
                                                     "rcnn_neg")}
    got = nnx.jit(lambda m, x, t, s: m.loss(x, t, s))(det, images, targets, samples)
    for name in ("loss_rpn_cls", "loss_rpn_bbox", "loss_cls", "loss_bbox", "loss_mask"):
      np.testing.assert_allclose(got[name], golden[name], rtol=TOL_X64, err_msg=name)

  def total(m, x, t, k):
    return sum(m.loss(x, t, key=k).values())

  grads = nnx.jit(nnx.grad(total))(_mini_detector(), jnp.asarray(images, jnp.float32),
                                   targets, jax.random.key(0))
  norms = {name: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(part))))
           for name, part in (("backbone", grads.backbone), ("rpn", grads.rpn_head),
                              ("box", grads.roi_head.bbox_head),
                              ("mask", grads.roi_head.mask_head))}
  assert all(np.isfinite(v) and v > 0 for v in norms.values()), norms
