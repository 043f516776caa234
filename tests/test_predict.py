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
