"""Training augmentations: host-side PIL transforms and device-side batch ops.

Each op is checked against an expectation computed here independently (numpy models of
the pixel arithmetic or of nearest-neighbour sampling at pixel centres), not against the
implementation's own building blocks.
"""

from __future__ import annotations

import functools
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from internimage_jax import predict
from internimage_jax.training import augment, batch_augment
from internimage_jax.training.augment import RandAugment

REPO = Path(__file__).resolve().parents[1]
H, W = 40, 56  # test images: 56 wide, 40 high
FILL = (124, 116, 104)
NEAREST = Image.Resampling.NEAREST


def _image(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rng(seed: int = 0) -> np.random.Generator:
  return np.random.default_rng(seed)


# --- random resized crop -------------------------------------------------------------------


def test_random_resized_crop_output_size_and_mode():
  image = Image.fromarray(_image())
  for size in (16, 33, 80):
    out = augment.random_resized_crop(image, size, _rng(size))
    assert out.size == (size, size) and out.mode == "RGB"


def test_random_resized_crop_area_and_ratio_statistics():
  # A square crop whose area is uniform in [0.2, 0.4] always fits a 1000x1000 image.
  rng = _rng(1)
  boxes = np.array([augment.random_resized_crop_params(1000, 1000, rng, (0.2, 0.4), (1, 1))
                    for _ in range(2000)])
  top, left, h, w = boxes.T
  frac = h * w / 1e6
  assert frac.min() >= 0.2 - 1e-3 and frac.max() <= 0.4 + 1e-3
  assert abs(frac.mean() - 0.3) < 0.005
  assert abs(frac.std() - 0.2 / math.sqrt(12)) < 0.005  # uniform on an interval of 0.2
  assert (h == w).all()
  # The top-left corner is uniform over the positions that keep the crop inside.
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + h <= 1000).all() and (left + w <= 1000).all()
  rel = top / (1000 - h)
  assert abs(rel.mean() - 0.5) < 0.03 and rel.min() < 0.02 and rel.max() > 0.98

  # The default ranges on a small image: every box inside, area and ratio in range up to
  # the rounding of the sides.
  for _ in range(500):
    top, left, h, w = augment.random_resized_crop_params(W, H, rng)
    assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
    assert 0.08 * 0.8 <= h * w / (H * W) <= 1.0
    assert 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1


def test_random_resized_crop_fallback_is_a_clamped_centre_crop():
  # No crop with a ratio in [3/4, 4/3] and >= 8% of the area fits a 400x10 strip.
  assert augment.random_resized_crop_params(400, 10, _rng()) == (0, (400 - 13) // 2, 10, 13)
  assert augment.random_resized_crop_params(10, 400, _rng()) == ((400 - 13) // 2, 0, 13, 10)
  # Areas above the image's never fit; a ratio within the range keeps the whole image.
  assert augment.random_resized_crop_params(30, 30, _rng(), (1.5, 2.0)) == (0, 0, 30, 30)
  assert augment.random_resized_crop_params(W, H, _rng(), (1.5, 2.0), (1.0, 2.0)) == (0, 0, H, W)


def test_random_resized_crop_resizes_its_box_and_is_deterministic():
  array = _image()
  image = Image.fromarray(array)
  out = augment.random_resized_crop(image, 24, _rng(5), interpolation=NEAREST)
  top, left, h, w = augment.random_resized_crop_params(W, H, _rng(5))
  # Nearest resize samples the box at the centres of a 24x24 grid.
  rows = top + np.floor((np.arange(24) + 0.5) * h / 24).astype(int)
  cols = left + np.floor((np.arange(24) + 0.5) * w / 24).astype(int)
  np.testing.assert_array_equal(np.asarray(out), array[rows][:, cols])

  a = np.asarray(augment.random_resized_crop(image, 24, _rng(7)))
  b = np.asarray(augment.random_resized_crop(image, 24, _rng(7)))
  c = np.asarray(augment.random_resized_crop(image, 24, _rng(8)))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_horizontal_flip_probabilities():
  array = _image()
  image = Image.fromarray(array)
  for seed in range(5):
    np.testing.assert_array_equal(np.asarray(augment.horizontal_flip(image, _rng(seed), 0.0)),
                                  array)
    np.testing.assert_array_equal(np.asarray(augment.horizontal_flip(image, _rng(seed), 1.0)),
                                  array[:, ::-1])
  rng = _rng(3)
  flipped = [not np.array_equal(np.asarray(augment.horizontal_flip(image, rng)), array)
             for _ in range(400)]
  assert 0.4 < np.mean(flipped) < 0.6


# --- RandAugment ops -----------------------------------------------------------------------


def _apply(name: str, array: np.ndarray, magnitude: float, seed: int = 0, **kw) -> np.ndarray:
  """Exactly one application of op `name` at a fixed magnitude."""
  ra = RandAugment(ops=(name,), magnitude=magnitude, num_ops=1, prob=1.0, **kw)
  return np.asarray(ra(Image.fromarray(array), _rng(seed)))


def _one_of(out: np.ndarray, candidates: list[np.ndarray], atol: float = 0) -> int:
  """Index of the candidate `out` matches (within atol); fails if none does."""
  errors = [np.abs(out.astype(int) - c.astype(int)).max() for c in candidates]
  assert min(errors) <= atol, errors
  return int(np.argmin(errors))


def _both_signs(name, array, magnitude, candidates, atol=0, **kw):
  # Random-sign ops: every result is one of the two, and over seeds both occur.
  seen = {_one_of(_apply(name, array, magnitude, seed, **kw), candidates, atol)
          for seed in range(12)}
  assert seen == {0, 1}


def _nearest_affine(array: np.ndarray, matrix, fill=FILL) -> np.ndarray:
  """PIL's affine warp with nearest sampling: output pixel centre -> input coordinates."""
  a, b, c, d, e, f = matrix
  h, w = array.shape[:2]
  y, x = np.mgrid[0:h, 0:w] + 0.5
  xs = np.floor(a * x + b * y + c).astype(int)
  ys = np.floor(d * x + e * y + f).astype(int)
  inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
  out = array[np.clip(ys, 0, h - 1), np.clip(xs, 0, w - 1)]
  return np.where(inside[..., None], out, np.array(fill, np.uint8))


def _rotation(degrees: float) -> tuple[float, ...]:
  # Counter-clockwise on screen (y down) about the image centre, as inverse mapping.
  t = math.radians(degrees)
  cx, cy = W / 2, H / 2
  return (math.cos(t), -math.sin(t), cx - math.cos(t) * cx + math.sin(t) * cy,
          math.sin(t), math.cos(t), cy - math.sin(t) * cx - math.cos(t) * cy)


def test_invert_posterize_solarize_pixel_rules():
  x = _image()
  np.testing.assert_array_equal(_apply("Invert", x, 9), 255 - x)
  # magnitude 7.5 -> fraction 0.75: classic keeps int(3) bits, increasing 4 - 3 = 1 bit.
  np.testing.assert_array_equal(_apply("Posterize", x, 7.5), x & 0b11100000)
  np.testing.assert_array_equal(_apply("PosterizeIncreasing", x, 7.5), x & 0b10000000)
  np.testing.assert_array_equal(_apply("PosterizeIncreasing", x, 0), x & 0b11110000)
  np.testing.assert_array_equal(_apply("PosterizeIncreasing", x, 10), np.zeros_like(x))
  # Solarize inverts pixels at or above the threshold: classic int(0.75 * 256) = 192,
  # increasing 256 - 192 = 64; at magnitude 0 the increasing one is the identity.
  np.testing.assert_array_equal(_apply("Solarize", x, 7.5), np.where(x >= 192, 255 - x, x))
  np.testing.assert_array_equal(_apply("SolarizeIncreasing", x, 7.5),
                                np.where(x >= 64, 255 - x, x))
  np.testing.assert_array_equal(_apply("SolarizeIncreasing", x, 0), x)


def test_solarize_add_brightens_dark_pixels_only():
  x = _image()
  add = int(0.9 * 110)
  want = np.where(x < 128, np.minimum(x.astype(int) + add, 255), x)
  np.testing.assert_array_equal(_apply("SolarizeAdd", x, 9), want)
  # Above the usual scale (mmax raised) the addition saturates at 255.
  want = np.where(x < 128, np.minimum(x.astype(int) + 220, 255), x)
  assert (want == 255).any()
  np.testing.assert_array_equal(_apply("SolarizeAdd", x, 20, magnitude_max=20), want)


def test_auto_contrast_stretches_each_channel():
  x = (_image().astype(int) // 3 + np.array([20, 60, 100])).astype(np.uint8)
  lo, hi = x.min((0, 1)), x.max((0, 1))
  want = (x - lo) * 255.0 / (hi - lo)
  out = _apply("AutoContrast", x, 9)
  assert np.abs(out - want).max() <= 1.0
  assert (out.min((0, 1)) == 0).all() and (out.max((0, 1)) == 255).all()


def test_equalize_flattens_the_histogram():
  # Dark-skewed input: the equalised image is a monotone remapping with a flat histogram.
  x = (np.random.default_rng(0).random((H, W, 3)) ** 3 * 255).astype(np.uint8)
  out = _apply("Equalize", x, 9)
  for ch in range(3):
    order = np.argsort(x[..., ch], axis=None, kind="stable")
    assert (np.diff(out[..., ch].ravel()[order].astype(int)) >= 0).all()  # monotone
    # Histogram equalisation: a value maps to the count of smaller pixels (plus half a
    # step) in steps of (N - count of the top value) / 255.
    counts = np.bincount(x[..., ch].ravel(), minlength=256)
    top = counts[np.nonzero(counts)[0][-1]]
    step = (x[..., ch].size - top) // 255
    before = np.concatenate([[0], np.cumsum(counts)[:-1]])
    lut = np.minimum((before + step // 2) // step, 255)
    np.testing.assert_array_equal(out[..., ch], lut[x[..., ch]])
  assert abs(out.mean() - 127.5) < 10 and x.mean() < 80


def _enhance_expectations(x: np.ndarray, factor: float) -> dict[str, np.ndarray]:
  xf = x.astype(np.float64)
  grey = (xf[..., 0] * 299 + xf[..., 1] * 587 + xf[..., 2] * 114) / 1000.0
  mean = int(grey.mean() + 0.5)
  padded = np.pad(xf, ((1, 1), (1, 1), (0, 0)), mode="edge")
  smooth = sum(padded[1 + dy:H + 1 + dy, 1 + dx:W + 1 + dx] for dy in (-1, 0, 1)
               for dx in (-1, 0, 1)) + 4 * xf
  smooth = np.round(smooth / 13)
  smooth[0], smooth[-1], smooth[:, 0], smooth[:, -1] = xf[0], xf[-1], xf[:, 0], xf[:, -1]
  blend = lambda base: np.clip(base + factor * (xf - base), 0, 255)  # noqa: E731
  return {"Brightness": blend(0.0), "Contrast": blend(float(mean)),
          "Color": blend(grey[..., None]), "Sharpness": blend(smooth)}


@pytest.mark.parametrize("name", ["Brightness", "Contrast", "Color", "Sharpness"])
def test_enhance_ops_blend_with_the_expected_factor(name):
  x = _image()
  # Classic: factor 0.9 * 1.8 + 0.1 = 1.72; increasing: 1 +- 0.9 * 0.9.
  out = _apply(name, x, 9)
  _one_of(out, [_enhance_expectations(x, 1.72)[name]], atol=2)
  _both_signs(name + "Increasing", x, 9,
              [_enhance_expectations(x, 1.81)[name], _enhance_expectations(x, 0.19)[name]],
              atol=2)
  np.testing.assert_array_equal(_apply(name + "Increasing", x, 0), x)  # factor 1


def test_rotate():
  x = _image()
  np.testing.assert_array_equal(_apply("Rotate", x, 0), x)
  # 0.9 * 30 = 27 degrees either way, corners filled with the fill colour.
  _both_signs("Rotate", x, 9, [_nearest_affine(x, _rotation(27)),
                               _nearest_affine(x, _rotation(-27))], interpolation=NEAREST)
  out = _apply("Rotate", x, 9)  # bicubic, the default
  np.testing.assert_array_equal(out[0, 0], FILL)
  np.testing.assert_array_equal(out[-1, -1], FILL)


def test_shear():
  x = _image()
  s = 0.9 * 0.3
  _both_signs("ShearX", x, 9, [_nearest_affine(x, (1, s, 0, 0, 1, 0)),
                               _nearest_affine(x, (1, -s, 0, 0, 1, 0))], interpolation=NEAREST)
  _both_signs("ShearY", x, 9, [_nearest_affine(x, (1, 0, 0, s, 1, 0)),
                               _nearest_affine(x, (1, 0, 0, -s, 1, 0))], interpolation=NEAREST)


def test_translate_shifts_by_the_relative_amount_with_fill():
  x = _image()
  # TranslateYRel at magnitude 5: 0.5 * 0.45 * 40 = 9 rows; an integer shift is exact
  # even with bicubic resampling.
  up, down = np.empty_like(x), np.empty_like(x)
  up[:], down[:] = FILL, FILL
  up[:H - 9], down[9:] = x[9:], x[:H - 9]
  _both_signs("TranslateYRel", x, 5, [up, down])
  # TranslateXRel: 0.5 * 0.45 * 56 = 12.6 columns, sampled nearest at pixel centres
  # (content moves 13 columns).
  px = 0.5 * 0.45 * W
  _both_signs("TranslateXRel", x, 5, [_nearest_affine(x, (1, 0, px, 0, 1, 0)),
                                      _nearest_affine(x, (1, 0, -px, 0, 1, 0))],
              interpolation=NEAREST)
  left = _apply("TranslateXRel", x, 5, interpolation=NEAREST)
  assert (np.all(left[:, -13:] == FILL) and np.array_equal(left[:, :W - 13], x[:, 13:])
          or np.all(left[:, :13] == FILL) and np.array_equal(left[:, 13:], x[:, :W - 13]))


def test_affine_ops_use_the_fill_colour():
  x = _image()
  out = _apply("TranslateYRel", x, 10, fill=(1, 2, 3))  # 18 rows uncovered
  assert (out.reshape(-1, 3) == (1, 2, 3)).all(-1).sum() >= 18 * W


# --- RandAugment policy --------------------------------------------------------------------


def test_spec_parsing():
  ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
  assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.magnitude_max, ra.prob) == (
      9.0, 2, 0.5, 10.0, 0.5)
  assert ra.ops == augment.INCREASING_OPS and len(ra.ops) == 15
  assert ra.fill == FILL and ra.interpolation == Image.Resampling.BICUBIC
  ra = RandAugment.from_spec("rand", fill=(0, 0, 0), interpolation=NEAREST)
  assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.prob) == (10.0, 2, 0.0, 0.5)
  assert ra.ops == augment.CLASSIC_OPS and ra.fill == (0, 0, 0)
  assert "Posterize" in ra.ops and "PosterizeIncreasing" not in ra.ops
  ra = RandAugment.from_spec("rand-n3-p0.7-mmax20-inc0-m12.5")
  assert (ra.num_ops, ra.prob, ra.magnitude_max, ra.magnitude) == (3, 0.7, 20.0, 12.5)
  assert ra.ops == augment.CLASSIC_OPS
  assert RandAugment.from_spec("rand-m9-mstd101").magnitude_std == math.inf

  for bad, named in [("rnd-m9", "rand"), ("rand-x3", "x3"), ("rand-m", "'m'"),
                     ("rand-mfoo", "mfoo"), ("rand--m9", "''"), ("rand-m9.5.1", "m9.5.1"),
                     ("rand-n2.5", "n2.5"), ("rand-M9", "M9"), ("rand-p2", "prob")]:
    with pytest.raises(ValueError, match=named):
      RandAugment.from_spec(bad)
  with pytest.raises(ValueError, match="Nonsense"):
    RandAugment(ops=("Nonsense",))


def test_magnitude_sampling():
  rng = _rng()
  ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
  draws = np.array([ra._sample_magnitude(rng) for _ in range(4000)])
  assert abs(draws.mean() - 9.0) < 0.03 and abs(draws.std() - 0.5) < 0.03
  assert draws.max() == 10.0 and draws.min() >= 0  # clipped at mmax
  assert RandAugment.from_spec("rand-m9")._sample_magnitude(rng) == 9.0
  assert RandAugment.from_spec("rand-m15")._sample_magnitude(rng) == 10.0
  assert RandAugment.from_spec("rand-m15-mmax20")._sample_magnitude(rng) == 15.0
  uniform = RandAugment.from_spec("rand-m8-mstd200")
  draws = np.array([uniform._sample_magnitude(rng) for _ in range(4000)])
  assert draws.min() >= 0 and draws.max() <= 8 and abs(draws.mean() - 4) < 0.15


def test_op_count_and_probability():
  x = _image()
  image = Image.fromarray(x)
  invert = functools.partial(RandAugment, ops=("Invert",), magnitude=9)
  np.testing.assert_array_equal(np.asarray(invert(num_ops=2, prob=1.0)(image, _rng())), x)
  np.testing.assert_array_equal(np.asarray(invert(num_ops=3, prob=1.0)(image, _rng())), 255 - x)
  np.testing.assert_array_equal(np.asarray(invert(num_ops=4, prob=0.0)(image, _rng())), x)
  rng = _rng(1)
  once = invert(num_ops=1, prob=0.5)
  inverted = [np.array_equal(np.asarray(once(image, rng)), 255 - x) for _ in range(400)]
  assert 0.4 < np.mean(inverted) < 0.6
  # Ops are drawn uniformly with replacement: with two ops (Invert, AutoContrast on an
  # already stretched image, i.e. identity) and n=2, p=1, the image ends up inverted
  # exactly when Invert was drawn once: probability 1/2.
  x[0, 0], x[0, 1] = 0, 255
  image = Image.fromarray(x)
  two = RandAugment(ops=("Invert", "AutoContrast"), num_ops=2, prob=1.0)
  rng = _rng(2)
  inverted = [np.array_equal(np.asarray(two(image, rng)), 255 - x) for _ in range(400)]
  assert 0.4 < np.mean(inverted) < 0.6


# --- whole transforms ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_train_transform_output(mode):
  image = Image.fromarray(_image()).convert(mode)
  transform = augment.TrainTransform(24, randaugment="rand-m9-mstd0.5-inc1")
  out = transform(image, _rng())
  assert out.shape == (24, 24, 3) and out.dtype == np.uint8
  if mode == "L":  # grey becomes three equal channels (RandAugment's fill is not grey)
    out = augment.TrainTransform(24)(image, _rng())
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_train_transform_determinism_and_pickling():
  image = Image.fromarray(_image())
  transform = augment.TrainTransform(24, randaugment="rand-m9-mstd0.5-inc1")
  a, b, c = transform(image, _rng(3)), transform(image, _rng(3)), transform(image, _rng(4))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  copy = pickle.loads(pickle.dumps(transform))
  np.testing.assert_array_equal(copy(image, _rng(3)), a)
  eval_copy = pickle.loads(pickle.dumps(augment.EvalTransform(24)))
  assert eval_copy(image).shape == (24, 24, 3)
  with pytest.raises(ValueError, match="x3"):
    augment.TrainTransform(24, randaugment="rand-x3")


def test_train_transform_without_crop_is_a_resize_then_flip():
  array = _image()
  image = Image.fromarray(array)
  plain = augment.TrainTransform(24, random_resized_crop=False, hflip=1.0)
  want = np.asarray(image.resize((24, 24), Image.Resampling.BICUBIC))[:, ::-1]
  np.testing.assert_array_equal(plain(image, _rng()), want)
  # Cropping with scale (1, 1) and ratio equal to the image's is the same resize.
  full = augment.TrainTransform(24, scale=(1.0, 1.0), ratio=(W / H, W / H), hflip=0.0)
  np.testing.assert_array_equal(full(image, _rng()), want[:, ::-1])


@pytest.mark.parametrize("w,h,size", [(65, 40, 24), (40, 65, 24), (57, 57, 32), (56, 40, 20)])
def test_eval_transform_matches_predict_preprocess(w, h, size):
  image = Image.fromarray(_image(1, h, w))
  out = augment.EvalTransform(size)(image)
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(augment.eval_resize_crop(image, size)), out)
  want = predict.preprocess(image, size)
  undone = (want * np.float32(predict.IMAGENET_STD) + np.float32(predict.IMAGENET_MEAN)) * 255.0
  np.testing.assert_allclose(out, undone, atol=1e-3)
  # And the device-side normalisation completes predict's transform.
  np.testing.assert_allclose(np.asarray(batch_augment.normalize(out)), want, atol=1e-6)


# --- random erasing ------------------------------------------------------------------------
# The batch ops take their probabilities as traced arguments here, so that each test
# reuses one compiled program (compiling them is most of these tests' time on a CPU).

ERASE = jax.jit(batch_augment.random_erasing)
ERASE_BATCH = jnp.asarray(np.random.default_rng(0).normal(size=(400, H, W, 3)), jnp.float32)


def test_random_erasing_prob_zero_is_identity():
  images = ERASE_BATCH[:4]
  assert batch_augment.random_erasing(jax.random.key(0), images, 0.0) is images
  static = jax.jit(functools.partial(batch_augment.random_erasing, prob=0.0))
  np.testing.assert_array_equal(static(jax.random.key(0), images), images)
  np.testing.assert_array_equal(ERASE(jax.random.key(0), ERASE_BATCH, 0.0), ERASE_BATCH)


def test_random_erasing_erases_one_rectangle_per_image():
  out = np.asarray(ERASE(jax.random.key(1), ERASE_BATCH, 1.0))
  changed = out != np.asarray(ERASE_BATCH)
  fractions = []
  for i in range(len(out)):
    pixels = changed[i].any(-1)
    rows, cols = np.nonzero(pixels.any(1))[0], np.nonzero(pixels.any(0))[0]
    assert rows.size and cols.size
    box = np.zeros_like(pixels)
    box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    np.testing.assert_array_equal(pixels, box)  # a filled rectangle ...
    assert changed[i][box].all()  # ... in every channel
    assert rows.size < H and cols.size < W
    fractions.append(box.mean())
  # Area fraction in [0.02, 1/3] up to the rounding of the sides, and spread over it.
  assert 0.02 * 0.8 <= min(fractions) < 0.04 and 0.3 < max(fractions) <= 1 / 3 * 1.06
  noise = out[changed]
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1.0) < 0.02


def test_random_erasing_rate():
  out = ERASE(jax.random.key(2), ERASE_BATCH, 0.25)
  erased = np.asarray((out != ERASE_BATCH).any((1, 2, 3)))
  assert abs(erased.mean() - 0.25) < 0.07  # 400 images: std 0.022
  again = ERASE(jax.random.key(3), ERASE_BATCH, 0.25)
  assert not np.array_equal(out, again)
  np.testing.assert_array_equal(ERASE(jax.random.key(2), ERASE_BATCH, 0.25), out)


# --- mixup / cutmix ------------------------------------------------------------------------

MIX_IMAGES = jnp.asarray(np.random.default_rng(4).normal(size=(4, 12, 10, 3)), jnp.float32)
LABELS = jnp.array([0, 1, 2, 3])  # the flipped batch has a different label everywhere
CLASSES = 8


@jax.jit
def _mix_many(mixup_alpha, cutmix_alpha, prob, switch_prob, smoothing):
  """2000 independent draws on MIX_IMAGES: images [2000, 4, 12, 10, 3], targets [2000, 4, 8]."""
  def one(key):
    return batch_augment.mixup_cutmix(key, MIX_IMAGES, LABELS, CLASSES, mixup_alpha=mixup_alpha,
                                      cutmix_alpha=cutmix_alpha, prob=prob,
                                      switch_prob=switch_prob, label_smoothing=smoothing)
  return jax.vmap(one)(jax.random.split(jax.random.key(11), 2000))


def _plain_targets(smoothing: float = 0.0) -> np.ndarray:
  off = smoothing / CLASSES
  want = np.full((4, CLASSES), off, np.float32)
  want[np.arange(4), LABELS] = 1 - smoothing + off
  return want


def test_mixup_cutmix_off_returns_images_and_smoothed_targets():
  for kw in (dict(mixup_alpha=0.0, cutmix_alpha=0.0), dict(prob=0.0)):
    fn = jax.jit(functools.partial(batch_augment.mixup_cutmix, num_classes=CLASSES, **kw))
    out, targets = fn(jax.random.key(0), MIX_IMAGES, LABELS)
    np.testing.assert_array_equal(out, MIX_IMAGES)
    np.testing.assert_allclose(targets, _plain_targets(0.1), rtol=1e-6)
    assert targets.dtype == jnp.float32
  # The same with the zeros traced.
  for args in ((0.0, 0.0, 1.0, 0.5, 0.1), (0.8, 1.0, 0.0, 0.5, 0.1)):
    out, targets = _mix_many(*args)
    np.testing.assert_array_equal(out, np.broadcast_to(MIX_IMAGES, out.shape))
    np.testing.assert_allclose(targets, np.broadcast_to(_plain_targets(0.1), targets.shape),
                               rtol=1e-6)
  # 1 - 0.1 + 0.1 / 8 on the label, 0.1 / 8 elsewhere.
  np.testing.assert_allclose(targets[0, 0, :2], [0.9125, 0.0125], rtol=1e-6)


def test_mixup_blends_with_the_flipped_batch():
  out, targets = _mix_many(0.8, 0.0, 1.0, 0.5, 0.0)
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  lam = np.asarray(targets[:, 0, 0])  # weight of example 0's own label
  np.testing.assert_allclose(targets[:, 0, 3], 1 - lam, atol=1e-6)
  np.testing.assert_allclose(targets[:, 1, 1], lam, atol=1e-6)  # one lambda per batch
  lam5 = lam[:, None, None, None, None]
  np.testing.assert_allclose(out, lam5 * MIX_IMAGES + (1 - lam5) * MIX_IMAGES[::-1], atol=1e-5)
  # lam ~ Beta(0.8, 0.8): mean 1/2, variance a^2 / ((2a)^2 (2a + 1)) = 1 / (4 * 2.6).
  assert abs(lam.mean() - 0.5) < 0.025
  assert abs(lam.var() - 1 / 10.4) < 0.01


def test_cutmix_pastes_a_rectangle_and_weighs_targets_by_its_area():
  h, w = MIX_IMAGES.shape[1:3]
  out, targets = map(np.asarray, _mix_many(0.0, 1.0, 1.0, 0.5, 0.0))
  x, xf = np.asarray(MIX_IMAGES), np.asarray(MIX_IMAGES[::-1])
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  areas = []
  for o, t in zip(out[:500], targets[:500]):
    pasted = (o == xf).all(-1)
    assert ((o == x).all(-1) | pasted).all()  # every pixel is the image's or its mirror's
    assert (pasted == pasted[0]).all()  # one box for the whole batch
    pasted = pasted[0]
    area = pasted.mean()
    if area:
      rows, cols = np.nonzero(pasted.any(1))[0], np.nonzero(pasted.any(0))[0]
      assert pasted[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
      assert area == rows.size * cols.size / (h * w)
    np.testing.assert_allclose(t[np.arange(4), LABELS[::-1]], area, atol=1e-6)
    np.testing.assert_allclose(t[np.arange(4), LABELS], 1 - area, atol=1e-6)
    areas.append(area)
  # Beta(1, 1) asks for a box of (1 - lam) of the image, uniform; clipping at the borders
  # and the even sides make the pasted fraction smaller on average.
  assert 0.15 < np.mean(areas) < 0.45 and max(areas) > 0.6


def test_switch_probability_and_mix_probability():
  out, targets = map(np.asarray, _mix_many(0.8, 1.0, 0.5, 0.5, 0.0))
  x, xf = np.asarray(MIX_IMAGES), np.asarray(MIX_IMAGES[::-1])
  no_mix = (targets == _plain_targets()).all((1, 2))
  assert abs(no_mix.mean() - 0.5) < 0.04  # 2000 draws: std 0.011
  assert (out[no_mix] == x).all()
  # Of the mixed batches, half are cutmix (every pixel is one of the two sources).
  cut = ((out == x) | (out == xf)).all((1, 2, 3, 4))[~no_mix]
  assert abs(cut.mean() - 0.5) < 0.05


def test_mixup_cutmix_label_smoothing():
  _, targets = map(np.asarray, _mix_many(0.8, 1.0, 1.0, 0.5, 0.1))
  np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)
  # Labels outside the pair keep exactly the smoothing floor 0.1 / 8; the pair shares
  # the rest as lam * on + (1 - lam) * off and vice versa.
  np.testing.assert_allclose(targets[:, :, 4:], 0.0125, rtol=1e-6)
  lam = (targets[:, 0, 0] - 0.0125) / 0.9
  np.testing.assert_allclose(targets[:, 0, 3], (1 - lam) * 0.9 + 0.0125, atol=1e-6)
  assert lam.min() < 0.05 and lam.max() > 0.95


def test_mixup_cutmix_mixes_uint8_images_in_float32():
  images = jax.ShapeDtypeStruct((4, 12, 10, 3), jnp.uint8)
  fn = functools.partial(batch_augment.mixup_cutmix, num_classes=10)
  out, targets = jax.eval_shape(fn, jax.random.key(0), images, LABELS)
  assert out.dtype == jnp.float32 and out.shape == images.shape
  assert targets.dtype == jnp.float32 and targets.shape == (4, 10)


def test_normalize():
  images = np.arange(2 * 3 * 3).reshape(2, 1, 3, 3).astype(np.uint8) * 20
  mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
  got = jax.jit(batch_augment.normalize)(images, mean, std)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, (images / 255.0 - mean) / std, rtol=1e-6, atol=1e-6)


def test_batch_ops_on_a_sharded_batch():
  # Two host devices in a fresh process: the sharded results equal the unsharded ones.
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from internimage_jax.training import batch_augment as ba
assert jax.device_count() == 2
images = jax.random.randint(jax.random.key(0), (8, 16, 16, 3), 0, 256).astype(jnp.uint8)
labels = jnp.arange(8) % 5
def step(key, images, labels):
  k1, k2 = jax.random.split(key)
  x = ba.random_erasing(k1, ba.normalize(images), 0.5)
  return ba.mixup_cutmix(k2, x, labels, 5)
want = jax.jit(step)(jax.random.key(1), images, labels)
shard = NamedSharding(jax.make_mesh((2,), ("data",)), P("data"))
got = jax.jit(step)(jax.random.key(1), jax.device_put(images, shard),
                    jax.device_put(labels, shard))
assert len(got[0].sharding.device_set) == 2
for g, w in zip(got, want):
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, check=False)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("extra,left", [(1, 0), (3, 2), (5, 2), (6, 3)])
def test_eval_crop_offset_rounds_like_torchvision(extra, left):
  """torchvision's CenterCrop offset is round((W - size) / 2), half to even."""
  size = 24
  columns = np.broadcast_to(np.arange(size + extra, dtype=np.uint8)[None, :, None],
                            (size, size + extra, 3))
  out = np.asarray(augment.eval_resize_crop(Image.fromarray(np.ascontiguousarray(columns)), size))
  np.testing.assert_array_equal(out[0, :, 0], np.arange(left, left + size))
