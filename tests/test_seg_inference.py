"""Segmentation test-time inference on canvases (models/segmentation/inference.py) against
direct computations on the unpadded images: PyTorch's bilinear resize, mmseg's sliding
windows, flip and multi-scale averaging, and mmseg's ``intersect_and_union`` counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from helpers import precision
from internimage_jax import models
from internimage_jax.models.segmentation import inference
from internimage_jax.training.segmentation.task import segmentation_metrics


@functools.cache
def _segmentor() -> models.Segmentor:
  with precision(np.float64):
    return models.create_segmentor(
        num_classes=5, backbone=dict(channels=8, depths=(1, 1, 1, 1), groups=(1, 2, 2, 4)),
        decode_head=dict(channels=8, pool_scales=(1, 2)), auxiliary_head=False,
        param_dtype=jnp.float64, rngs=nnx.Rngs(0))


def _torch_resize(x: np.ndarray, size) -> np.ndarray:
  """NHWC bilinear resize as mmseg's ``resize`` (align_corners False, no antialias)."""
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(t, size=tuple(size), mode="bilinear",
                                        align_corners=False)
  return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size,out", [((5, 7), (13, 4)), ((16, 16), (3, 30)), ((1, 9), (6, 9))])
def test_resize_region_is_pytorch_bilinear_on_the_valid_region(size, out):
  with precision(np.float64):
    x = np.random.default_rng(0).normal(size=(1, *size, 3))
    canvas = np.full((20, 20, 3), 1e6)  # the padding must not leak in
    canvas[:size[0], :size[1]] = x[0]
    got = inference.resize_region(jnp.asarray(canvas), jnp.asarray(size), jnp.asarray(out),
                                  (32, 32))
    np.testing.assert_allclose(np.asarray(got)[:out[0], :out[1]], _torch_resize(x, out)[0],
                               rtol=1e-12, atol=1e-12)


def test_flip_region_mirrors_within_each_width():
  x = jnp.arange(2 * 1 * 6).reshape(2, 1, 6, 1)
  got = np.asarray(inference.flip_region(x, jnp.asarray([4, 6])))[..., 0]
  np.testing.assert_array_equal(got[0, 0, :4], [3, 2, 1, 0])
  np.testing.assert_array_equal(got[1, 0], np.arange(6, 12)[::-1])


def _padded(images: list[np.ndarray], canvas):
  x = np.zeros((len(images), *canvas, images[0].shape[-1]))
  for i, image in enumerate(images):
    x[i, :image.shape[0], :image.shape[1]] = image
  return jnp.asarray(x), jnp.asarray([im.shape[:2] for im in images])


def test_whole_logits_on_a_canvas_of_the_image_size_are_the_segmentors():
  seg = _segmentor()
  with precision(np.float64):
    x = np.random.default_rng(1).normal(size=(2, 40, 56, 3))
    got = inference.whole_logits(seg, *_padded(list(x), (40, 56)))
    np.testing.assert_allclose(np.asarray(got), np.asarray(seg(jnp.asarray(x))), rtol=0,
                               atol=1e-12)


def _slide_reference(seg, image: np.ndarray, crop, stride) -> np.ndarray:
  """mmseg's ``slide_inference`` on one unpadded HWC image, written out directly."""
  h, w = image.shape[:2]
  rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
  cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
  total = count = 0
  infer = nnx.jit(lambda seg, x: seg(x))  # one compile for every window of the crop size
  for i in range(rows):
    for j in range(cols):
      y2, x2 = min(i * stride[0] + crop[0], h), min(j * stride[1] + crop[1], w)
      y1, x1 = max(y2 - crop[0], 0), max(x2 - crop[1], 0)
      logits = np.asarray(infer(seg, jnp.asarray(image[None, y1:y2, x1:x2])))[0]
      pad = ((y1, h - y2), (x1, w - x2), (0, 0))
      total = total + np.pad(logits, pad)
      count = count + np.pad(np.ones((y2 - y1, x2 - x1, 1)), pad)
  return total / count


def test_slide_logits_are_mmseg_sliding_windows_for_each_image_size():
  seg = _segmentor()
  crop, stride = (32, 32), (21, 21)
  with precision(np.float64):
    rng = np.random.default_rng(2)
    images = [rng.normal(size=(32, 75, 3)), rng.normal(size=(64, 40, 3))]
    x, size = _padded(images, (64, 96))
    got = np.asarray(inference.slide_logits(seg, x, size, crop, stride))
    for b, image in enumerate(images):
      h, w = image.shape[:2]
      np.testing.assert_allclose(got[b, :h, :w], _slide_reference(seg, image, crop, stride),
                                 rtol=0, atol=1e-12)


def test_predicted_labels_average_softmax_at_the_original_size():
  with precision(np.float64):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(1, 8, 12, 4)), rng.normal(size=(1, 16, 24, 4))
    canvas_a, size_a = _padded([a[0]], (16, 16))
    canvas_b, size_b = _padded([b[0]], (32, 32))
    original = jnp.asarray([[11, 13]])
    one = inference.predict_labels([(canvas_a, size_a)], original, (20, 20), rows_per_chunk=4)
    np.testing.assert_array_equal(np.asarray(one)[0, :11, :13],
                                  _torch_resize(a, (11, 13))[0].argmax(-1))
    two = inference.predict_labels([(canvas_a, size_a), (canvas_b, size_b)], original, (20, 20),
                                   rows_per_chunk=8)
    probs = sum(torch.softmax(torch.from_numpy(_torch_resize(v, (11, 13))), -1).numpy()
                for v in (a, b))
    np.testing.assert_array_equal(np.asarray(two)[0, :11, :13], probs[0].argmax(-1))


def _mmseg_counts(pred, label, classes):
  """mmseg's ``intersect_and_union`` (``torch.histc`` over the non-ignored pixels)."""
  mask = label != 255
  pred, label = torch.from_numpy(pred[mask]).float(), torch.from_numpy(label[mask]).float()
  inter = pred[pred == label]
  hist = lambda v: torch.histc(v, bins=classes, min=0, max=classes - 1).numpy()  # noqa: E731
  return hist(inter), hist(pred), hist(label)


def test_confusion_counts_and_metrics_are_mmsegs():
  rng = np.random.default_rng(4)
  pred = rng.integers(0, 4, (3, 9, 7)).astype(np.int32)
  label = rng.integers(0, 4, (3, 9, 7)).astype(np.uint8)
  label[rng.random(label.shape) < 0.2] = 255
  label[0, 0, :3] = 7  # out of range: counted nowhere, as histc drops it
  label[label == 3] = 255  # class 3 never labelled: its accuracy is NaN
  valid = np.array([True, True, False])
  got = jax.device_get(inference.confusion_counts(jnp.asarray(pred), jnp.asarray(label), 4,
                                                  jnp.asarray(valid)))
  inter, area_pred, area_label = _mmseg_counts(pred[valid], label[valid], 4)
  np.testing.assert_array_equal(got["intersect"], inter)
  np.testing.assert_array_equal(got["pred_area"], area_pred)
  np.testing.assert_array_equal(got["label_area"], area_label)
  np.testing.assert_array_equal(got["union"], area_pred + area_label - inter)
  m = segmentation_metrics(got["intersect"], got["union"], got["label_area"])
  iou = inter / (area_pred + area_label - inter)
  assert m["miou"] == pytest.approx(np.nanmean(iou))
  with np.errstate(invalid="ignore"):
    want_acc = inter / area_label
  assert np.isnan(m["acc"][3]) and m["macc"] == pytest.approx(np.nanmean(want_acc))
  assert m["aacc"] == pytest.approx(inter.sum() / area_label.sum())
