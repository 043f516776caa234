"""InternImage-G fine-tuned from ImageNet-22K to ImageNet-1K at 512x512: the original recipe
(20 epochs, 2 warm-up, LR 2e-5 per 512 images, layer-wise LR decay 0.9, 0.1 LR on the
deformable offsets, label smoothing 0.3, no mixup / cutmix / random erasing).

    python train.py --config configs/internimage_g_22kto1k_512.py --workdir /ckpt/internimage_g_22kto1k_512 \
        --config.data.dir=/data/tfds --config.init_from=/pretrained/internimage_g_pretrainto22k_384.pth

`init_from` is the official 22K checkpoint (internimage_g_pretrainto22k_384.pth); evaluate the published
1K weights with `--config.mode=eval --config.init_from=internimage_g_22kto1k_512.pth`.
Expected result: ImageNet-1K val top-1 90.1% (the original's published number; this recipe has
not yet been run to completion here). Global batch 512 as in the original; learning rates
scale with it. Variants (comma-separated, e.g. ``configs/internimage_g_22kto1k_512.py:bf16,folder``):
bf16, fsdp, folder (``config.data.dir`` = ImageNet folder with train/ and val/).
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config, fine_tune


def get_config(variant: str | None = None) -> ConfigDict:
  cfg = base_config()
  cfg.model.name = "internimage_g"
  cfg.model.overrides.drop_path_rate = 0.4
  cfg.data.image_size = 512
  fine_tune(cfg)
  cfg.train.global_batch = 512
  cfg.mesh.update(data=1, fsdp=-1)  # too large to replicate (the original used ZeRO)
  cfg.model.remat = "block"  # activations of 50+ blocks at this resolution (docs/scaling.md)
  return apply_variants(cfg, variant)
