"""Inference for a person: transform, class names and the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import MINI_T, require_golden
from internimage_jax import predict

REPO = Path(__file__).resolve().parents[1]


def test_imagenet_class_names_ship_with_the_package():
  names = predict.imagenet_classes()
  assert len(names) == 1000
  assert names[0] == "tench" and names[207] == "golden retriever" and names[281] == "tabby"


def test_preprocess_resizes_the_short_side_and_centre_crops():
  # A 40x20 (w x h) image whose left and right quarters are black, middle white.
  array = np.zeros((20, 40, 3), np.uint8)
  array[:, 10:30] = 255
  out = predict.preprocess(Image.fromarray(array), 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.float32
  # Short side 20 -> 10 makes it 20x10; the centre 10 columns are the white middle.
  white = (1.0 - np.float32(predict.IMAGENET_MEAN)) / np.float32(predict.IMAGENET_STD)
  np.testing.assert_allclose(out[:, 2:8], np.broadcast_to(white, (10, 6, 3)), atol=0.05)


def test_unreadable_image_error_names_the_file(tmp_path):
  bad = tmp_path / "bad.jpg"
  bad.write_text("not an image")
  with pytest.raises(ValueError, match="bad.jpg"):
    predict.load_image(bad)


def test_command_line_prints_top5(tmp_path):
  ckpt = tmp_path / "mini_t"
  subprocess.run(
      [sys.executable, "-m", "internimage_jax.convert", "--model", "internimage_t",
       "--checkpoint", str(require_golden() / "model_mini_t.pth"), "--out", str(ckpt),
       "--options", json.dumps(MINI_T)], check=True, cwd=REPO, capture_output=True)
  image = tmp_path / "cat.png"
  Image.fromarray((np.random.default_rng(0).random((70, 90, 3)) * 255).astype(np.uint8)).save(image)
  bad = tmp_path / "broken.jpg"
  bad.write_bytes(b"\xff\xd8garbage")
  result = subprocess.run(
      [sys.executable, "-m", "internimage_jax.predict", "--model", "internimage_t",
       "--checkpoint", str(ckpt), "--image-size", "64", str(image), str(bad)],
      capture_output=True, text=True, cwd=REPO, check=False)
  lines = result.stdout.strip().splitlines()
  assert lines[0] == str(image)
  probs = [float(line.split("%")[0]) / 100 for line in lines[1:]]
  assert len(probs) == 5 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
  assert "cannot read image" in result.stderr and "broken.jpg" in result.stderr
  assert "Traceback" not in result.stderr
  assert result.returncode == 1  # one image failed


def test_deep_images_are_scaled_to_8_bits(tmp_path):
  ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
  Image.fromarray(ramp).save(tmp_path / "ramp16.png")  # read back as mode I;16
  rgb = np.asarray(predict.load_image(tmp_path / "ramp16.png"))
  assert rgb.dtype == np.uint8 and rgb.shape == (4, 256, 3)
  np.testing.assert_allclose(rgb[0, :, 0], np.linspace(0, 255, 256), atol=0.51)
  floats = Image.fromarray(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4), "F")
  from internimage_jax.training.augment import to_rgb
  np.testing.assert_allclose(np.asarray(to_rgb(floats))[..., 0].ravel(),
                             np.linspace(0, 255, 16), atol=0.51)


def test_a_too_large_image_is_reported_and_the_others_still_predicted(tmp_path, monkeypatch,
                                                                     capsys):
  from internimage_jax import convert, models

  model = models.create("internimage_t", num_classes=10, **MINI_T)
  convert.save_orbax(model, tmp_path / "ckpt", {"model": "internimage_t", "num_classes": 10,
                                                "options": MINI_T})
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2x that is Pillow's hard limit
  big, small = tmp_path / "big.png", tmp_path / "small.png"
  Image.new("RGB", (100, 100)).save(big)
  Image.new("RGB", (20, 20)).save(small)
  code = predict.main(["--model", "internimage_t", "--checkpoint", str(tmp_path / "ckpt"),
                       "--image-size", "32", str(big), str(small)])
  out, err = capsys.readouterr()
  assert code == 1
  assert err.startswith(f"error: image {big} is too large to read safely: Image size (10000 "
                        "pixels) exceeds limit") and err.count("\n") == 1
  assert out.splitlines()[0] == str(small) and len(out.splitlines()) == 6


# --- segmentation ---------------------------------------------------------------------------

TINY_SEG = dict(backbone=dict(channels=8, depths=(1, 1, 1, 1), groups=(1, 2, 2, 4)),
                decode_head=dict(channels=8, pool_scales=(1, 2)),
                auxiliary_head=dict(channels=8))


@pytest.fixture(scope="module")
def tiny_segmentor(tmp_path_factory):
  """A tiny 150-class UperNet saved as a converted checkpoint with its ``model.json``."""
  from flax import nnx

  from internimage_jax import convert
  from internimage_jax.models.segmentation import create_segmentor

  seg = create_segmentor("upernet_internimage_t", num_classes=150, rngs=nnx.Rngs(3), **TINY_SEG)
  # conv_seg starts at std 0.01: scale it up so that the classes are well separated.
  kernel = seg.decode_head.conv_seg.kernel
  kernel.set_value(kernel.get_value() * 300)
  ckpt = tmp_path_factory.mktemp("seg") / "tiny"
  convert.save_orbax(seg, ckpt, {"model": "upernet_internimage_t", "num_classes": 150,
                                 "options": TINY_SEG})
  return seg, ckpt


def _image(path: Path, w: int, h: int, seed: int = 0) -> Path:
  # Smooth colour regions plus noise, so the labels form regions of several classes.
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(6 * xx), np.cos(5 * yy), np.sin(4 * (xx + yy))], -1) * 100 + 128
  array = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
  Image.fromarray(array).save(path)
  return path


def _expected_labels(seg, image_path: Path, img_scale) -> tuple[np.ndarray, np.ndarray]:
  """Independently: the segmentor's own whole-image logits at the test size, resized
  (jax.image bilinear, no antialias) to the original size; the argmax and the margin."""
  import jax.numpy as jnp

  from internimage_jax.models.segmentation import resize

  from flax import nnx

  image = predict.load_image(image_path)
  x = predict.seg_preprocess(image, img_scale)
  logits = nnx.jit(lambda m, x: m(x))(seg, jnp.asarray(x[None]))  # eager is slower
  logits = resize(logits, (image.height, image.width))[0]
  top2 = np.sort(np.asarray(logits), axis=-1)[..., -2:]
  return np.asarray(jnp.argmax(logits, -1)), top2[..., 1] - top2[..., 0]


def test_seg_preprocess_is_the_test_pipeline():
  # 100x60 (w x h) -> keep ratio to (2048, 512): f = min(2048/100, 512/60) -> 853x512,
  # width rounded up to 864.
  x = predict.seg_preprocess(Image.new("RGB", (100, 60), (255, 255, 255)), (2048, 512))
  assert x.shape == (512, 864, 3) and x.dtype == np.float32
  white = (1.0 - np.float32(predict.IMAGENET_MEAN)) / np.float32(predict.IMAGENET_STD)
  np.testing.assert_allclose(x[5, 5], white, rtol=1e-6)
  assert predict.seg_img_scale("upernet_internimage_l") == (2560, 640)
  assert predict.seg_img_scale("upernet_internimage_h") == (3584, 896)


def test_output_names_and_shares():
  assert predict.output_paths("o/ov.png", ["a/x.jpg"]) == [(Path("o/ov.png"),
                                                            Path("o/ov_labels.png"))]
  assert predict.output_paths("ov.jpg", ["x.png", "y.png"]) == [
      (Path("ov_x.jpg"), Path("ov_x_labels.png")), (Path("ov_y.jpg"), Path("ov_y_labels.png"))]
  assert predict.output_paths("ov.png", ["a/x.png", "b/x.png"])[1] == (
      Path("ov_2_x.png"), Path("ov_2_x_labels.png"))
  labels = np.array([[3, 3, 3], [0, 7, 7]])
  assert predict.class_shares(labels, 150) == [(0.5, 3), (2 / 6, 7), (1 / 6, 0)]


def test_segmentation_command_line(tiny_segmentor, tmp_path, capsys):
  seg, ckpt = tiny_segmentor
  image = _image(tmp_path / "room.png", 90, 70)
  out = tmp_path / "out" / "overlay.png"
  scale = ("--img-scale", "128", "64")
  code = predict.main(["--task", "segmentation", "--model", "upernet_internimage_t",
                       "--checkpoint", str(ckpt), *scale, str(image), "--out", str(out)])
  printed, err = capsys.readouterr()
  assert code == 0, err
  over = Image.open(out)
  assert over.size == (90, 70) and over.mode == "RGB"
  labels = np.asarray(Image.open(tmp_path / "out" / "overlay_labels.png"))
  assert labels.dtype == np.uint8 and labels.shape == (70, 90)

  expected, margin = _expected_labels(seg, image, (128, 64))
  assert len(np.unique(expected)) > 1  # a test that can tell classes apart
  clear = margin > 1e-3  # float summation order may flip exact near-ties only
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(labels[clear], expected[clear])

  # The overlay is half image, half palette colour.
  names, palette = predict.seg_classes(150)
  blend = (np.asarray(Image.open(image), np.float32) + palette[labels]) / 2
  np.testing.assert_allclose(np.asarray(over, np.float32), blend, atol=1.0)

  lines = printed.strip().splitlines()
  assert lines[0] == f"{image} -> {out} {tmp_path / 'out' / 'overlay_labels.png'}"
  shares = [(float(line.split("%")[0]), line.split("%", 1)[1].strip()) for line in lines[1:]]
  assert abs(sum(s for s, _ in shares) - 100) < 0.05
  assert [s for s, _ in shares] == sorted((s for s, _ in shares), reverse=True)
  counts = np.bincount(labels.ravel(), minlength=150)
  top = int(np.argmax(counts))
  assert shares[0][1] == f"{names[top]} ({top})"
  assert shares[0][0] == pytest.approx(100 * counts[top] / labels.size, abs=0.006)
  assert len(shares) == np.count_nonzero(counts)


def test_segmentation_slide_and_several_images(tiny_segmentor, tmp_path, capsys):
  _, ckpt = tiny_segmentor
  wide = _image(tmp_path / "wide.png", 150, 50, seed=1)  # test size 96x288 > crop 64
  small = _image(tmp_path / "small.png", 20, 30, seed=2)  # test size 96x64
  bad = tmp_path / "bad.jpg"
  bad.write_text("not an image")
  out = tmp_path / "seg.png"
  code = predict.main(["--task", "segmentation", "--model", "upernet_internimage_t",
                       "--checkpoint", str(ckpt), "--img-scale", "384", "96", "--slide",
                       "--crop", "64", "--stride", "40", "--out", str(out),
                       str(wide), str(bad), str(small)])
  printed, err = capsys.readouterr()
  assert code == 1  # one image failed, the others written
  assert err.startswith("error: cannot read image") and "bad.jpg" in err
  assert err.count("\n") == 1
  assert Image.open(tmp_path / "seg_wide.png").size == (150, 50)
  assert np.asarray(Image.open(tmp_path / "seg_wide_labels.png")).shape == (50, 150)
  assert Image.open(tmp_path / "seg_small.png").size == (20, 30)
  assert not (tmp_path / "seg_bad.png").exists()
  assert printed.count(" -> ") == 2


def test_segmentation_errors_are_one_line(tiny_segmentor, tmp_path, capsys):
  _, ckpt = tiny_segmentor
  image = _image(tmp_path / "x.png", 40, 30)
  common = ["--task", "segmentation", "--out", str(tmp_path / "o.png"), str(image)]
  cases = [
      (["--model", "upernet_internimage_q", "--checkpoint", str(ckpt)], "unknown segmentor"),
      # model.json's options on S's backbone (post-norm): other parameters.
      (["--model", "upernet_internimage_s", "--checkpoint", str(ckpt)], "does not match"),
      (["--model", "upernet_internimage_t", "--checkpoint", str(tmp_path / "no.pth")],
       "not found"),
      (["--model", "upernet_internimage_t", "--checkpoint", str(ckpt), "--out", "o.xyz"],
       "unknown image format"),
  ]
  for args, message in cases:
    assert predict.main(common + args) == 1
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert out == "" and not (tmp_path / "o.png").exists()


# --- detection ------------------------------------------------------------------------------

# A tiny Mask R-CNN, its options as model.json gives them back (lists): the loaded
# detectors then compile to the programs of the first.
TINY_DET = json.loads(json.dumps(dict(
    backbone=dict(channels=16, depths=(1, 1, 1, 1), groups=(1, 2, 4, 8)),
    neck=dict(out_channels=16),
    roi_head=dict(bbox_roi_extractor=dict(finest_scale=16), bbox_head=dict(fc_out_channels=32),
                  mask_roi_extractor=dict(finest_scale=16),
                  mask_head=dict(num_convs=1, conv_out_channels=16)),
    test_cfg=dict(rpn=dict(nms_pre=200, max_per_img=50), rcnn=dict(max_per_img=20)))))
DET_SCALE = ("--img-scale", "128", "96")


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
  """A tiny 3-class Mask R-CNN saved as an orbax checkpoint with a train.py-style
  ``model.json`` (task, model, classes, options)."""
  from flax import nnx

  from internimage_jax import convert
  from internimage_jax.models.detection import create_detector

  det = create_detector("mask_rcnn_internimage_t", num_classes=3, rngs=nnx.Rngs(0), **TINY_DET)
  # fc_cls starts at std 0.01: scale it up so that some detections score well.
  kernel = det.roi_head.bbox_head.fc_cls.kernel
  kernel.set_value(kernel.get_value() * 20)
  ckpt = tmp_path_factory.mktemp("det") / "tiny"
  convert.save_orbax(det, ckpt, {"task": "detection", "model": "mask_rcnn_internimage_t",
                                 "num_classes": 3, "options": TINY_DET})
  return ckpt


def _parse_detection(line: str) -> tuple[str, float, list[float], int]:
  """``  name  score  x1 y1 x2 y2  area px`` (names may hold spaces)."""
  words = line.split()
  assert words[-1] == "px", line
  return " ".join(words[:-7]), float(words[-7]), [float(v) for v in words[-6:-2]], int(words[-2])


def test_coco_detection_class_names_ship_with_the_package():
  names = predict.coco_classes()
  assert len(names) == 80 and len(set(names)) == 80
  assert names[:3] == ("person", "bicycle", "car") and names[-1] == "toothbrush"
  assert names[9] == "traffic light" and names[62] == "tv" and names[79] == "toothbrush"
  assert predict.det_classes(80) == list(names)
  assert predict.det_classes(3) == ["class 0", "class 1", "class 2"]
  palette = predict.det_palette(80)
  assert palette.shape == (80, 3) and palette.dtype == np.uint8
  assert len({tuple(c) for c in palette}) == 80
  np.testing.assert_array_equal(predict.det_palette(3), palette[:3])


def test_detection_preprocess_is_the_test_pipeline():
  # 100x60 (w x h) -> fit (1333, 800): f = min(1333/100, 800/60) = 13.33 -> 1333x800,
  # padded to 1344x800 with zeros after normalisation.
  x, size, factors = predict.det_preprocess(Image.new("RGB", (100, 60), (255, 255, 255)))
  assert x.shape == (800, 1344, 3) and x.dtype == np.float32 and size == (800, 1333)
  assert factors == (13.33, 800 / 60)
  white = (1.0 - np.float32(predict.IMAGENET_MEAN)) / np.float32(predict.IMAGENET_STD)
  np.testing.assert_allclose(x[5, 1332], white, rtol=1e-6)
  assert not x[:, 1333:].any()
  _, size, _ = predict.det_preprocess(Image.new("RGB", (90, 70)), (128, 96))
  assert size == (96, 123)  # f = min(128/90, 96/70)


def test_detection_command_line(tiny_detector, tmp_path, capsys):
  ckpt = tiny_detector
  image = _image(tmp_path / "street.png", 90, 70)
  out = tmp_path / "out" / "boxes.png"
  code = predict.main(["--task", "detection", "--model", "mask_rcnn_internimage_t",
                       "--checkpoint", str(ckpt), *DET_SCALE, "--score-thr", "0.3",
                       str(image), "--out", str(out)])
  printed, err = capsys.readouterr()
  assert code == 0, err
  drawn = Image.open(out)
  assert drawn.size == (90, 70) and drawn.mode == "RGB"
  lines = printed.strip().splitlines()
  n = int(lines[0].split(": ")[1].split()[0])
  assert lines[0] == f"{image} -> {out}: {n} detections with score > 0.3" and n > 1
  rows = [_parse_detection(line) for line in lines[1:]]
  assert len(rows) == n
  assert all(name in ("class 0", "class 1", "class 2") for name, *_ in rows)
  scores = [score for _, score, _, _ in rows]
  assert scores == sorted(scores, reverse=True) and min(scores) > 0.3

  # The library function: the same detections, in the original image's pixels.
  det = predict.load_detector("mask_rcnn_internimage_t", ckpt)
  dets = predict.detect_objects(det, predict.load_image(image), (128, 96), 0.3)
  boxes, masks = dets["boxes"], dets["masks"]
  assert len(boxes) == n and masks.shape == (n, 70, 90) and masks.dtype == bool
  np.testing.assert_allclose(dets["scores"], scores, atol=5e-4)
  np.testing.assert_allclose(boxes, [b for _, _, b, _ in rows], atol=0.051)
  assert [int(m.sum()) for m in masks] == [a for *_, a in rows]
  assert (boxes >= 0).all() and (boxes[:, 2] <= 90).all() and (boxes[:, 3] <= 70).all()
  assert (boxes[:, :2] <= boxes[:, 2:]).all()
  # At the test size (123x96) boxes reach past the original's 90 columns; rescaled, the
  # widest still reaches the image's right part.
  assert boxes[:, 2].max() > 60
  # Each mask lies in its box (pasted at the original size, a bilinear tap of margin).
  yy, xx = np.mgrid[0:70, 0:90] + 0.5
  assert masks.any(axis=(1, 2)).sum() > n // 2
  for (x1, y1, x2, y2), mask in zip(boxes, masks):
    mx, my = (x2 - x1) / 28 + 1, (y2 - y1) / 28 + 1
    inside = (xx > x1 - mx) & (xx < x2 + mx) & (yy > y1 - my) & (yy < y2 + my)
    assert not (mask & ~inside).any()


def test_detection_drawing():
  image = Image.fromarray(np.full((60, 80, 3), 100, np.uint8))
  masks = np.zeros((2, 60, 80), bool)
  masks[0, 30:50, 10:40] = True
  masks[1, 35:45, 50:70] = True
  dets = {"boxes": np.array([[10, 30, 40, 50], [50, 35, 70, 45]], np.float32),
          "scores": np.array([0.9, 0.5], np.float32), "labels": np.array([2, 0]),
          "masks": masks}
  palette = predict.det_palette(3)
  out = np.asarray(predict.draw_detections(image, dets, ["a", "b", "c"], palette, 0.5))
  assert out.shape == (60, 80, 3)
  np.testing.assert_allclose(out[40, 25], (100 + palette[2].astype(float)) / 2, atol=1)
  np.testing.assert_allclose(out[40, 60], (100 + palette[0].astype(float)) / 2, atol=1)
  assert (out[30, 20] == palette[2]).all()  # the box's top edge
  assert (out[55:, :] == 100).all()  # nothing drawn below the detections
  assert (out[18:30, 10:12] != 100).any()  # a label above the first box


def test_detection_several_images(tiny_detector, tmp_path, capsys):
  # Both test sizes pad to 96x128 (one compiled network): 90x70 -> 123x96, 60x46 -> 125x96.
  a = _image(tmp_path / "a.png", 90, 70, seed=1)
  b = _image(tmp_path / "b.png", 60, 46, seed=2)
  bad = tmp_path / "bad.jpg"
  bad.write_text("not an image")
  out = tmp_path / "det.jpg"
  code = predict.main(["--task", "detection", "--model", "mask_rcnn_internimage_t",
                       "--checkpoint", str(tiny_detector), *DET_SCALE, "--score-thr", "0",
                       "--top", "2", "--out", str(out), str(a), str(bad), str(b)])
  printed, err = capsys.readouterr()
  assert code == 1  # one image failed, the others drawn
  assert err.startswith("error: cannot read image") and "bad.jpg" in err
  assert err.count("\n") == 1
  assert Image.open(tmp_path / "det_a.jpg").size == (90, 70)
  assert Image.open(tmp_path / "det_b.jpg").size == (60, 46)
  assert not (tmp_path / "det_bad.jpg").exists()
  assert not list(tmp_path.glob("*labels*"))  # detection writes no label map
  lines = printed.strip().splitlines()
  assert [line.split(" -> ")[0] for line in lines if " -> " in line] == [str(a), str(b)]
  assert len(lines) == 6  # --top 2 of 20 detections each
  for line in lines:
    if " -> " not in line:
      _, score, (x1, y1, x2, y2), area = _parse_detection(line)
      assert 0 < score <= 1 and 0 <= x1 <= x2 <= 90 and 0 <= y1 <= y2 <= 70 and area >= 0


def test_detection_errors_are_one_line(tiny_detector, tmp_path, capsys):
  image = _image(tmp_path / "x.png", 40, 30)
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(b"\x00" * 64)
  seg_run = tmp_path / "seg_run"
  seg_run.mkdir()
  (seg_run / "model.json").write_text(json.dumps(
      {"task": "segmentation", "model": "upernet_internimage_t", "num_classes": 150,
       "options": TINY_SEG}))
  model = ["--model", "mask_rcnn_internimage_t"]
  out = ["--out", str(tmp_path / "o.png")]
  cases = [
      (["--task", "detection", *model, "--checkpoint", str(tiny_detector)],
       "needs --out"),
      (["--task", "detection", *model, "--checkpoint", str(corrupt), *out], "corrupt"),
      (["--task", "detection", *model, "--checkpoint", str(tmp_path / "no.pth"), *out],
       "checkpoint not found"),
      (["--task", "detection", "--model", "mask_rcnn_internimage_l", "--checkpoint",
        str(tiny_detector), *out], "unknown detector"),
      (["--task", "detection", *model, "--checkpoint", str(seg_run), *out],
       "pass --task segmentation"),
      (["--task", "detection", *model, "--checkpoint", "in1k", *out],
       "is a classification checkpoint; the Mask R-CNN's"),
      # model.json's options on the official test_cfg but 80 classes: other shapes.
      (["--task", "detection", *model, "--checkpoint", str(tiny_detector),
        "--num-classes", "80", *out], "does not match"),
      (["--task", "detection", *model, "--checkpoint", str(tiny_detector), "--slide", *out],
       "for segmentation"),
      (["--task", "detection", *model, "--checkpoint", str(tiny_detector),
        "--score-thr", "2", *out], "--score-thr must be in"),
      ([*model, "--checkpoint", str(tiny_detector)], "pass --task detection"),
  ]
  for args, message in cases:
    assert predict.main(args + [str(image)]) == 1, args
    printed, err = capsys.readouterr()
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert printed == "" and not (tmp_path / "o.png").exists()
