"""Device-side batch augmentations: normalisation, random erasing, mixup / cutmix.

The original recipe ran these in PyTorch after the PIL transforms (timm's ``Normalize``
and ``RandomErasing`` per example, ``Mixup`` per batch). Here they are pure jax.numpy
functions of a PRNG key and the batch, with static shapes, so they run inside the jitted
training step on the (batch-sharded) arrays the host pipeline delivers as uint8; doing
them on the accelerator keeps the host's work and the host-to-device traffic at one
byte per pixel.

Probabilities, alphas and the smoothing may be Python numbers or traced scalars: the
program does not depend on their values, so a schedule (say, mixup switched off for
the last epochs) needs no recompilation. Python zeros skip the op entirely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from internimage_jax.training.augment import IMAGENET_MEAN, IMAGENET_STD


def normalize(images: jax.Array, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """``(images / 255 - mean) / std`` in float32; images ``[..., 3]`` in 0..255, mean/std in 0..1."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_erasing(key: jax.Array, images: jax.Array, prob: float | jax.Array,
                   area: tuple[float, float] = (0.02, 1 / 3),
                   log_ratio: tuple[float, float] = (math.log(0.3), math.log(1 / 0.3)),
                   attempts: int = 10) -> jax.Array:
  """timm's ``RandomErasing`` (mode 'pixel', one box) on each image of a normalised batch.

  With probability ``prob`` per image, the first of ``attempts`` random boxes (area
  fraction uniform in ``area``, log aspect ratio uniform in ``log_ratio``) that fits
  strictly inside the image is filled with standard normal noise, per pixel and channel.
  ``images``: float ``[B, H, W, C]``.
  """
  if isinstance(prob, (int, float)) and prob <= 0:
    return images
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(f"random_erasing works on normalised float images, got {images.dtype}")
  b, h, w, _ = images.shape
  k_uniform, k_noise = jax.random.split(key)
  # Every uniform number in one draw (each separate draw adds to the compile time):
  # columns [apply, top, left, areas..., log ratios...].
  u = jax.random.uniform(k_uniform, (b, 3 + 2 * attempts))
  apply = u[:, 0] < prob
  # All attempts are drawn at once; the first that fits is taken, which is the same
  # distribution as timm's loop that stops at the first fit.
  target = (area[0] + (area[1] - area[0]) * u[:, 3:3 + attempts]) * (h * w)
  aspect = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, 3 + attempts:])
  box_h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # half to even, as round()
  box_w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (box_h < h) & (box_w < w)
  first = jnp.argmax(fits, axis=1)[:, None]
  box_h = jnp.take_along_axis(box_h, first, axis=1)[:, 0]
  box_w = jnp.take_along_axis(box_w, first, axis=1)[:, 0]
  erase = apply & fits.any(axis=1)  # no fitting attempt: the image is left alone
  # Top-left corner uniform over the valid integer positions, inclusive of the last.
  top = jnp.floor(u[:, 1] * (h - box_h + 1)).astype(jnp.int32)
  left = jnp.floor(u[:, 2] * (w - box_w + 1)).astype(jnp.int32)
  top = jnp.minimum(top, h - box_h)
  left = jnp.minimum(left, w - box_w)
  rows = jnp.arange(h)[None, :, None]
  cols = jnp.arange(w)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
            & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
  mask = inside & erase[:, None, None]
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return jnp.where(mask[..., None], noise, images)


def smooth_one_hot(labels: jax.Array, num_classes: int,
                   smoothing: float | jax.Array = 0.0) -> jax.Array:
  """float32 ``[B, C]`` targets: ``1 - smoothing + smoothing / C`` on, ``smoothing / C`` off."""
  off = jnp.asarray(smoothing, jnp.float32) / num_classes
  on = 1.0 - jnp.asarray(smoothing, jnp.float32) + off
  hot = labels[:, None] == jnp.arange(num_classes)[None, :]
  return jnp.where(hot, on, off)


def mixup_cutmix(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float | jax.Array = 0.8, cutmix_alpha: float | jax.Array = 1.0,
                 prob: float | jax.Array = 1.0, switch_prob: float | jax.Array = 0.5,
                 label_smoothing: float | jax.Array = 0.1,
                 ) -> tuple[jax.Array, jax.Array]:
  """timm's ``Mixup`` in 'batch' mode (one lambda per batch, ``correct_lam=True``).

  Each image is mixed with its mirror in the batch (``images[::-1]``). With probability
  ``prob`` the batch is mixed: by cutmix with probability ``switch_prob`` when both
  alphas are positive (else by the one whose alpha is), lambda ~ Beta(alpha, alpha).
  Mixup blends ``lam * x + (1 - lam) * x[::-1]``; cutmix pastes a box of ``x[::-1]``
  whose area is about ``1 - lam`` of the image, and lambda becomes the exact unpasted
  fraction (the box is clipped at the borders). Returns ``(images, targets)`` with
  targets float32 ``[B, num_classes]``, label-smoothed and mixed with the same lambda.
  Integer images are mixed in float32 (and returned as they are when Python zeros turn
  mixing off).
  """
  targets = smooth_one_hot(labels, num_classes, label_smoothing)
  static = all(isinstance(v, (int, float)) for v in (mixup_alpha, cutmix_alpha, prob))
  if static and ((mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0):
    return images, targets
  if not jnp.issubdtype(images.dtype, jnp.floating):
    images = images.astype(jnp.float32)
  _, h, w, _ = images.shape
  k_uniform, k_lam = jax.random.split(key)
  u_mix, u_switch, u_cy, u_cx = jax.random.uniform(k_uniform, (4,))  # one draw, one compile
  mixup_alpha = jnp.asarray(mixup_alpha, jnp.float32)
  cutmix_alpha = jnp.asarray(cutmix_alpha, jnp.float32)

  # The choices are data, not Python branches (see the module docstring).
  do_mix = (u_mix < prob) & ((mixup_alpha > 0) | (cutmix_alpha > 0))
  use_cutmix = jnp.where((mixup_alpha > 0) & (cutmix_alpha > 0), u_switch < switch_prob,
                         cutmix_alpha > 0)
  # One Beta draw with the chosen method's alpha (a positive stand-in when it is unused).
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  alpha = jnp.where(alpha > 0, alpha, 1.0)
  lam = jnp.where(do_mix, jax.random.beta(k_lam, alpha, alpha), 1.0).astype(jnp.float32)

  # Cutmix box: sides sqrt(1 - lam) of the image's, centre uniform over the pixels, then
  # clipped to the image (timm's `rand_bbox`).
  cut = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(h * cut).astype(jnp.int32)
  cut_w = jnp.floor(w * cut).astype(jnp.int32)
  cy = jnp.minimum(jnp.floor(u_cy * h), h - 1).astype(jnp.int32)  # uniform in [0, h)
  cx = jnp.minimum(jnp.floor(u_cx * w), w - 1).astype(jnp.int32)
  y0, y1 = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
  x0, x1 = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  box = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)

  flipped = images[::-1]
  cutmixed = jnp.where(box[None, :, :, None], flipped, images)
  lam_x = lam.astype(images.dtype)
  mixed = lam_x * images + (1 - lam_x) * flipped
  cutmix_now = do_mix & use_cutmix
  out = jnp.where(cutmix_now, cutmixed, jnp.where(do_mix, mixed, images))
  # correct_lam: the target weight is the fraction of the image that was not pasted.
  box_area = ((y1 - y0) * (x1 - x0)).astype(jnp.float32)
  lam = jnp.where(cutmix_now, 1.0 - box_area / (h * w), lam)
  targets = lam * targets + (1.0 - lam) * targets[::-1]
  return out, targets
