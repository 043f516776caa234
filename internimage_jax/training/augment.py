"""Host-side image augmentations of the original InternImage ImageNet recipe.

The original trained with timm's ``create_transform`` (random resized crop, horizontal
flip, RandAugment ``rand-m9-mstd0.5-inc1``) followed on the tensor by normalisation and
random erasing, and mixed batches with timm's ``Mixup``. The PIL part lives here; the
batch part (normalisation, random erasing, mixup / cutmix) runs on the accelerator, see
``batch_augment``.

Everything random takes an explicit ``np.random.Generator``, so an example's
augmentation is a pure function of (image, generator state): the input pipeline seeds
one generator per example and gets the same augmented batches after a resume. Only numpy
and Pillow are used, and the transforms are plain dataclasses, so they pickle into
worker threads or processes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

BICUBIC = Image.Resampling.BICUBIC
# The normalisation of the official weights (and of every source here), in 0..1.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The mean in 0..255, (124, 116, 104): the colour timm fills uncovered areas of affine ops with.
IMAGENET_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)

# RandAugment's magnitude scale: a magnitude m means the fraction m / 10 of each op's range.
_LEVEL_DENOM = 10.0
_TRANSLATE_PCT = 0.45  # translations reach 45% of the image side at magnitude 10


# --- random resized crop, flip, evaluation crop -------------------------------------------


def random_resized_crop_params(width: int, height: int, rng: np.random.Generator,
                               scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3),
                               ) -> tuple[int, int, int, int]:
  """The ``(top, left, crop_height, crop_width)`` box of a random resized crop.

  torchvision's ``RandomResizedCrop.get_params``: up to 10 tries of an area fraction
  uniform in ``scale`` and a log-uniform aspect ratio (width / height) in ``ratio``;
  if none fits, a centre crop with the aspect ratio clamped into ``ratio``.
  """
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback (small or extremely elongated images): the largest centred crop whose
  # aspect ratio is inside the range, the whole image when its own ratio already is.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif in_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: Image.Image, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        interpolation: Image.Resampling = BICUBIC) -> Image.Image:
  """A random crop (see ``random_resized_crop_params``) resized to ``size x size``."""
  top, left, h, w = random_resized_crop_params(image.width, image.height, rng, scale, ratio)
  return image.crop((left, top, left + w, top + h)).resize((size, size), interpolation)


def horizontal_flip(image: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
  """Mirrors ``image`` left-right with probability ``p``."""
  if rng.random() < p:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return image


def eval_resize_crop(image: Image.Image, size: int,
                     interpolation: Image.Resampling = BICUBIC) -> Image.Image:
  """The evaluation transform: shorter side resized to ``size``, centre ``size x size`` crop.

  As the original's torchvision ``Resize(int)`` + ``CenterCrop``: the longer side
  truncates, the crop offset is ``round((new - size) / 2)`` (Python's half-to-even
  rounding, as torchvision). ``internimage_jax.predict`` uses this function too.
  """
  w, h = image.size
  if w <= h:
    new_w, new_h = size, int(size * h / w)
  else:
    new_w, new_h = int(size * w / h), size
  image = image.resize((new_w, new_h), interpolation)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return image.crop((left, top, left + size, top + size))


# --- RandAugment ---------------------------------------------------------------------------


def _signed(value: float, rng: np.random.Generator) -> float:
  # Geometric and "increasing" enhance ops go either way with equal chance.
  return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, matrix: tuple[float, ...], ra: RandAugment) -> Image.Image:
  # PIL's AFFINE maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f).
  return image.transform(image.size, Image.Transform.AFFINE, matrix,
                         resample=ra.interpolation, fillcolor=ra.fill)


def _auto_contrast(image, frac, rng, ra):
  return ImageOps.autocontrast(image)


def _equalize(image, frac, rng, ra):
  return ImageOps.equalize(image)


def _invert(image, frac, rng, ra):
  return ImageOps.invert(image)


def _rotate(image, frac, rng, ra):
  degrees = _signed(frac * 30.0, rng)
  return image.rotate(degrees, resample=ra.interpolation, fillcolor=ra.fill)


def _posterize_bits(image, bits):
  # Keeps the top `bits` bits of each channel. 0 bits (the increasing op at magnitude 10)
  # leaves a black image, as old Pillow did; Pillow >= 12's ImageOps.posterize refuses 0.
  if bits >= 8:
    return image
  mask = (0xFF << (8 - max(bits, 0))) & 0xFF
  return image.point([i & mask for i in range(256)] * len(image.getbands()))


def _posterize(image, frac, rng, ra):
  # Classic set: keeps int(frac * 4) bits, so a larger magnitude is a *weaker* op.
  return _posterize_bits(image, int(frac * 4))


def _posterize_increasing(image, frac, rng, ra):
  return _posterize_bits(image, 4 - int(frac * 4))


def _solarize(image, frac, rng, ra):
  # Classic set: threshold int(frac * 256), so a larger magnitude inverts fewer pixels
  # (timm's `_solarize_level_to_arg`).
  return ImageOps.solarize(image, int(frac * 256))


def _solarize_increasing(image, frac, rng, ra):
  return ImageOps.solarize(image, 256 - int(frac * 256))


def _solarize_add(image, frac, rng, ra):
  # Brightens the dark half only: pixels below 128 gain int(frac * 110), saturating.
  add = int(frac * 110)
  lut = [min(255, i + add) if i < 128 else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _enhancer(enhance_cls, increasing: bool):
  def op(image, frac, rng, ra):
    if increasing:
      # 1 +- 0.9 frac: identity at magnitude 0, stronger either way as it grows; the floor
      # only matters for magnitudes above 10.
      factor = max(0.1, 1.0 + _signed(frac * 0.9, rng))
    else:
      factor = frac * 1.8 + 0.1  # [0.1, 1.9]; 1.0 (identity) sits at magnitude 5
    return enhance_cls(image).enhance(factor)
  return op


def _shear_x(image, frac, rng, ra):
  return _affine(image, (1, _signed(frac * 0.3, rng), 0, 0, 1, 0), ra)


def _shear_y(image, frac, rng, ra):
  return _affine(image, (1, 0, 0, _signed(frac * 0.3, rng), 1, 0), ra)


def _translate_x_rel(image, frac, rng, ra):
  pixels = _signed(frac * _TRANSLATE_PCT, rng) * image.width
  return _affine(image, (1, 0, pixels, 0, 1, 0), ra)


def _translate_y_rel(image, frac, rng, ra):
  pixels = _signed(frac * _TRANSLATE_PCT, rng) * image.height
  return _affine(image, (1, 0, 0, 0, 1, pixels), ra)


# name -> op(image, level fraction, rng, RandAugment) -> image
_OPS: dict[str, Callable] = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": _invert,
    "Rotate": _rotate,
    "Posterize": _posterize,
    "PosterizeIncreasing": _posterize_increasing,
    "Solarize": _solarize,
    "SolarizeIncreasing": _solarize_increasing,
    "SolarizeAdd": _solarize_add,
    "Color": _enhancer(ImageEnhance.Color, False),
    "ColorIncreasing": _enhancer(ImageEnhance.Color, True),
    "Contrast": _enhancer(ImageEnhance.Contrast, False),
    "ContrastIncreasing": _enhancer(ImageEnhance.Contrast, True),
    "Brightness": _enhancer(ImageEnhance.Brightness, False),
    "BrightnessIncreasing": _enhancer(ImageEnhance.Brightness, True),
    "Sharpness": _enhancer(ImageEnhance.Sharpness, False),
    "SharpnessIncreasing": _enhancer(ImageEnhance.Sharpness, True),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x_rel,
    "TranslateYRel": _translate_y_rel,
}

# timm's `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS`, in its order.
CLASSIC_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
               "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness", "ShearX",
               "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                  "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                  "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
                  "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


@dataclasses.dataclass(frozen=True)
class RandAugment:
  """timm's RandAugment: ``num_ops`` ops drawn with replacement, each applied with ``prob``.

  Build it from a timm spec string with ``from_spec``; the constructor takes the op
  names directly (a single op with ``prob=1`` applies exactly that op).
  """

  ops: tuple[str, ...] = INCREASING_OPS
  magnitude: float = 10.0
  num_ops: int = 2
  magnitude_std: float = 0.0  # inf: magnitude uniform in [0, magnitude]
  magnitude_max: float = 10.0
  prob: float = 0.5
  fill: tuple[int, int, int] = IMAGENET_FILL
  interpolation: Image.Resampling = BICUBIC

  def __post_init__(self):
    unknown = [op for op in self.ops if op not in _OPS]
    if unknown or not self.ops:
      raise ValueError(f"unknown RandAugment op(s) {unknown}; known: {sorted(_OPS)}")
    if self.num_ops < 0 or not 0.0 <= self.prob <= 1.0 or self.magnitude_std < 0:
      raise ValueError(f"bad RandAugment settings: num_ops={self.num_ops}, prob={self.prob}, "
                       f"magnitude_std={self.magnitude_std}")
    if self.magnitude_max <= 0:
      raise ValueError(f"RandAugment magnitude_max must be positive, got {self.magnitude_max}")

  @classmethod
  def from_spec(cls, spec: str, fill: tuple[int, int, int] = IMAGENET_FILL,
                interpolation: Image.Resampling = BICUBIC) -> RandAugment:
    """Parses a timm spec such as ``"rand-m9-mstd0.5-inc1"``.

    Sections after ``rand`` are a key and a number: ``m`` magnitude (default 10), ``n``
    ops per image (2), ``mstd`` magnitude std (0; above 100 means uniform in [0, m] as in
    timm), ``mmax`` magnitude upper bound (10), ``inc`` 1 for the "increasing" op set
    (0), ``p`` probability of each op (0.5).
    """
    sections = spec.split("-")
    if sections[0] != "rand":
      raise ValueError(f"RandAugment spec {spec!r} must start with 'rand'")
    values: dict[str, float] = {}
    for section in sections[1:]:
      match = re.fullmatch(r"([a-z]+)(\d.*)", section)
      if match is None:
        raise ValueError(f"malformed RandAugment spec section {section!r} in {spec!r}")
      key, text = match.groups()
      if key not in ("m", "n", "mstd", "mmax", "inc", "p"):
        raise ValueError(f"unknown RandAugment spec key {key!r} (section {section!r}) in "
                         f"{spec!r}")
      try:
        value = float(text)
      except ValueError:
        raise ValueError(f"malformed RandAugment spec section {section!r} in {spec!r}") from None
      if key in ("n", "inc") and value != int(value):
        raise ValueError(f"RandAugment spec section {section!r} needs an integer")
      values[key] = value
    mstd = values.get("mstd", 0.0)
    return cls(ops=INCREASING_OPS if values.get("inc", 0) else CLASSIC_OPS,
               magnitude=values.get("m", _LEVEL_DENOM),
               num_ops=int(values.get("n", 2)),
               magnitude_std=math.inf if mstd > 100 else mstd,
               magnitude_max=values.get("mmax", _LEVEL_DENOM),
               prob=values.get("p", 0.5),
               fill=tuple(fill), interpolation=interpolation)

  def _sample_magnitude(self, rng: np.random.Generator) -> float:
    # A fresh magnitude per op application (timm's AugmentOp), clipped to [0, mmax].
    magnitude = self.magnitude
    if self.magnitude_std == math.inf:
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return float(min(max(magnitude, 0.0), self.magnitude_max))

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Applies ``num_ops`` random ops to an RGB image."""
    for index in rng.integers(0, len(self.ops), size=self.num_ops):
      if rng.random() >= self.prob:
        continue
      frac = self._sample_magnitude(rng) / _LEVEL_DENOM
      image = _OPS[self.ops[index]](image, frac, rng, self)
    return image


# --- whole transforms ----------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
  """8-bit RGB. Grey, palette, CMYK and alpha images become plain RGB (alpha dropped),
  as the original's folder loader did. Deeper images are scaled, not clipped: 16-bit
  integers (``I;16*``, and ``I``, which is how 16-bit files are read) by 255 / 65535,
  floating point (``F``) from [0, 1]."""
  if image.mode == "RGB":
    return image
  if image.mode == "I" or image.mode.startswith("I;16"):
    grey = np.clip(np.asarray(image, np.float64), 0, 65535) * (255 / 65535)
  elif image.mode == "F":
    grey = np.clip(np.nan_to_num(np.asarray(image, np.float64)), 0, 1) * 255
  else:
    return image.convert("RGB")
  return Image.fromarray(np.round(grey).astype(np.uint8), "L").convert("RGB")


def read_rgb(source) -> Image.Image:
  """Decodes an image file (a path or a file object) to 8-bit RGB (:func:`to_rgb`);
  Pillow's errors pass through."""
  with Image.open(source) as image:
    rgb = to_rgb(image)
    return image.copy() if rgb is image else rgb  # loaded before the file closes


@dataclasses.dataclass
class TrainTransform:
  """The training transform: random resized crop, flip, RandAugment -> uint8 ``[s, s, 3]``.

  ``random_resized_crop=False`` only resizes to ``size x size`` (tiny data sets, where a
  crop of 8% of the image would destroy the content).
  """

  size: int
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  hflip: float = 0.5
  randaugment: str = ""  # timm spec, e.g. "rand-m9-mstd0.5-inc1"; "" = off
  fill: tuple[int, int, int] = IMAGENET_FILL
  interpolation: Image.Resampling = BICUBIC
  random_resized_crop: bool = True

  def __post_init__(self):
    # Parsed once, here, so that a bad spec fails when the pipeline is built.
    self._randaugment = (RandAugment.from_spec(self.randaugment, self.fill, self.interpolation)
                         if self.randaugment else None)

  def __call__(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    image = to_rgb(image)
    if self.random_resized_crop:
      image = random_resized_crop(image, self.size, rng, self.scale, self.ratio,
                                  self.interpolation)
    else:
      image = image.resize((self.size, self.size), self.interpolation)
    image = horizontal_flip(image, rng, self.hflip)
    if self._randaugment is not None:
      image = self._randaugment(image, rng)
    return np.array(image, np.uint8)


@dataclasses.dataclass
class EvalTransform:
  """The evaluation transform (``eval_resize_crop``) -> uint8 ``[size, size, 3]``."""

  size: int
  interpolation: Image.Resampling = BICUBIC

  def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> np.ndarray:
    # `rng` is unused; it keeps the signature of the training transform.
    return np.array(eval_resize_crop(to_rgb(image), self.size, self.interpolation), np.uint8)
