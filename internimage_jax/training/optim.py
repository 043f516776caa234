"""The original recipe's optimizer: AdamW, clipping, warmup + cosine, per-512 LR scaling."""

from __future__ import annotations

import jax
import optax
from ml_collections import ConfigDict


def scaled_lr(lr: float, global_batch: int) -> float:
  """Learning rates in the recipes are per 512 images and scale linearly."""
  return lr * global_batch / 512


def schedule(cfg: ConfigDict, global_batch: int, total_steps: int,
             steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from the warmup LR, then cosine to the minimum LR, per iteration."""
  warmup = int(cfg.warmup_epochs * steps_per_epoch)
  return optax.warmup_cosine_decay_schedule(
      init_value=scaled_lr(cfg.warmup_lr, global_batch),
      peak_value=scaled_lr(cfg.lr, global_batch),
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=scaled_lr(cfg.min_lr, global_batch))


def decay_mask(params):
  """Weight decay on matrices and convolution kernels, not on 1-D tensors (norms, biases,
  layer scales)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ConfigDict, lr_schedule: optax.Schedule) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(cfg.clip_grad),
      optax.adamw(lr_schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
  )
