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
