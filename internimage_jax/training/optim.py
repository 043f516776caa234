"""The original recipes' optimizer: AdamW, clipping, warmup + cosine (classification), poly
(segmentation) or step (detection) schedules, LR scaling with the batch, layer-wise LR decay and the
deformable-offset LR multiplier."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from internimage_jax.models.partitioning import is_variable, stacked_dims

# Parameters whose LR gets ``dcn_lr_mul`` (matched in the official names, as the original).
DCN_LR_KEYWORDS = ("offset", "center_feature_scale_proj")


def scaled_lr(lr: float, global_batch: int, lr_batch: int = 512) -> float:
  """Learning rates in the recipes are per ``lr_batch`` images and scale linearly
  (``lr_batch`` 0: used as they are, as mmseg's recipes)."""
  return lr * global_batch / lr_batch if lr_batch else lr


def schedule(cfg: ConfigDict, global_batch: int, total_steps: int,
             steps_per_epoch: int) -> optax.Schedule:
  """The per-iteration learning rate of ``config.train``.

  ``cosine`` (the classification recipes): linear warmup from the warmup LR, then cosine
  to the minimum LR. ``poly`` (mmcv's ``PolyLrUpdaterHook`` with linear warmup, the
  segmentation recipes): ``(lr - min_lr) (1 - t / T) ** power + min_lr``, multiplied
  during the first ``W`` warmup iterations by ``1 - (1 - t / W) (1 - warmup_ratio)``.
  ``step`` (mmcv's ``StepLrUpdaterHook``, the detection recipes): ``lr`` times
  ``decay_rate`` for each of ``decay_epochs`` reached (epoch ``e`` starts at iteration
  ``e * steps_per_epoch``), with the same linear warmup as ``poly``.
  """
  warmup = cfg.warmup_steps or int(cfg.warmup_epochs * steps_per_epoch)
  peak = scaled_lr(cfg.lr, global_batch, cfg.lr_batch)
  end = scaled_lr(cfg.min_lr, global_batch, cfg.lr_batch)
  if cfg.schedule == "poly":
    def poly(step):
      t = jnp.asarray(step, jnp.float32)
      regular = (peak - end) * (1 - jnp.minimum(t, total_steps) / total_steps) ** cfg.power + end
      ramp = 1 - (1 - t / max(warmup, 1)) * (1 - cfg.warmup_ratio)
      return jnp.where(t < warmup, regular * ramp, regular)
    return poly
  if cfg.schedule == "step":
    milestones = jnp.asarray([int(e * steps_per_epoch) for e in cfg.decay_epochs] or [-1],
                             jnp.int32)

    def step_lr(step):
      t = jnp.asarray(step, jnp.int32)
      passed = jnp.sum((t >= milestones) & (milestones >= 0))
      regular = peak * jnp.asarray(cfg.decay_rate, jnp.float32) ** passed
      ramp = 1 - (1 - t.astype(jnp.float32) / max(warmup, 1)) * (1 - cfg.warmup_ratio)
      return jnp.where(t < warmup, regular * ramp, regular)
    return step_lr
  return optax.warmup_cosine_decay_schedule(
      init_value=scaled_lr(cfg.warmup_lr, global_batch, cfg.lr_batch),
      peak_value=peak,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=end)


def decay_mask(params):
  """Weight decay on matrices and convolution kernels, not on 1-D tensors (norms, biases,
  layer scales); a stacked block parameter by the rank of one block's. The segmentation
  recipes' rule (1-D, or named ``*.bias`` or ``*norm*``) selects the same parameters."""
  return jax.tree.map(lambda v: v.replace(v.get_value().ndim - stacked_dims(v) > 1), params,
                      is_leaf=is_variable)


def layer_decay_ratios(depths: Sequence[int], ratio: float) -> dict[str, float]:
  """Official-name prefix -> LR ratio, in the original's matching order: blocks counted
  from the last one backwards; the stem with the first block; each downsample and level
  norm with the next level's first block. Names matching none keep ratio 1."""
  ratios: dict[str, float] = {}
  power = 0
  for level in reversed(range(len(depths))):
    for block in reversed(range(depths[level])):
      ratios[f"levels.{level}.blocks.{block}."] = ratio ** power
      power += 1
  ratios["patch_embed"] = ratios["levels.0.blocks.0."]
  for level in range(len(depths) - 1):
    ratios[f"levels.{level}.downsample"] = ratios[f"levels.{level + 1}.blocks.0."]
    ratios[f"levels.{level}.norm"] = ratios[f"levels.{level + 1}.blocks.0."]
  return ratios


def segmentation_layer_decay_ratios(depths: Sequence[int], rate: float) -> dict[str, float]:
  """The segmentation recipes' ``CustomLayerDecayOptimizerConstructor`` (spec
  ``segmentation.md`` section 7) as official-name prefix -> ``rate ** (N + 1 - id)``,
  ``N = sum(depths)``: id 0 for the stem, ``1 + i`` for the ``i``-th block overall, the
  id of the next level's first block for a level's downsample and norm (level 3's own
  first block for level 3's norm); the heads (no prefix matches) keep ratio 1."""
  total = sum(depths)
  starts = np.cumsum((0, *depths))
  ratios = {f"levels.{level}.blocks.{block}.": rate ** (total - starts[level] - block)
            for level in range(len(depths)) for block in range(depths[level])}
  ratios["patch_embed"] = rate ** (total + 1)
  for level in range(len(depths)):
    first = starts[min(level + 1, len(depths) - 1)]
    ratios[f"levels.{level}.downsample"] = ratios[f"levels.{level}.norm"] = rate ** (total - first)
  return ratios


def lr_multiplier(name: str, ratios: dict[str, float], dcn_lr_mul: float) -> float:
  """The LR multiplier of the parameter with official name ``name``."""
  scale = next((r for prefix, r in ratios.items() if prefix in name), 1.0)
  if any(k in name for k in DCN_LR_KEYWORDS):
    scale *= dcn_lr_mul
  return scale


def lr_multipliers(model: nnx.Module, ratios: dict[str, float], dcn_lr_mul: float = 1.0):
  """A tree like the model's parameters of per-parameter LR multipliers (for a stacked
  parameter, one per block) from layer-decay ``ratios`` (official-name prefix -> ratio)
  and ``dcn_lr_mul``, or ``None`` when all are 1."""
  if not ratios and dcn_lr_mul == 1.0:
    return None
  from internimage_jax.convert import official_names

  names = official_names(model)
  # Same tree structure as the parameters (Variables included), with numbers as values.
  return nnx.from_flat_state([
      (path, var.replace(np.asarray([lr_multiplier(n, ratios, dcn_lr_mul)
                                     for n in names[path]], np.float64).reshape(
                                         var.get_value().shape[:stacked_dims(var)])))
      for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))])


def scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by a fixed per-parameter factor (LR groups without copies
  of the optimizer state, unlike ``optax.multi_transform``)."""

  def scale(u, m):
    # Per block along a stacked parameter's leading axis; in the update's dtype, as a
    # Python float multiplier would be.
    m = jnp.asarray(m, u.dtype)
    return u * m.reshape(m.shape + (1,) * (u.ndim - m.ndim))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, multipliers), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: ConfigDict, lr_schedule: optax.Schedule,
                   multipliers=None) -> optax.GradientTransformation:
  """Clip at the global norm (``clip_grad`` 0: no clipping), then AdamW; per-parameter
  LR multipliers scale the whole step (weight decay included), like the original's
  per-parameter LR groups."""
  parts = [optax.clip_by_global_norm(cfg.clip_grad)] if cfg.clip_grad else []
  parts += [optax.adamw(lr_schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                       mask=decay_mask)]
  if multipliers is not None:
    parts.append(scale_by_tree(multipliers))
  return optax.chain(*parts)
