"""InternImage-B trained from scratch on ImageNet-1K at 224x224: the original recipe
(300 epochs, 20 warm-up, LR 5e-4 per 512 images, RandAugment, mixup / cutmix, random
erasing, label smoothing 0.1, EMA 0.9999).

    python train.py --config configs/internimage_b_1k_224.py --workdir /ckpt/internimage_b_1k_224 \
        --config.data.dir=/data/tfds

Evaluate the published weights with
`--config.mode=eval --config.init_from=internimage_b_1k_224.pth`.
Expected result: ImageNet-1K val top-1 84.9% (the original's published number; this recipe has
not yet been run to completion here). Global batch 4096 as in the original; learning rates
scale with it. Variants (comma-separated, e.g. ``configs/internimage_b_1k_224.py:bf16,folder``):
bf16, fsdp, folder (``config.data.dir`` = ImageNet folder with train/ and val/).
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config


def get_config(variant: str | None = None) -> ConfigDict:
  cfg = base_config()
  cfg.model.name = "internimage_b"
  cfg.model.overrides.drop_path_rate = 0.5
  cfg.data.image_size = 224
  cfg.train.global_batch = 4096
  return apply_variants(cfg, variant)
