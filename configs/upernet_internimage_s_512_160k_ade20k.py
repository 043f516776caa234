"""UperNet + InternImage-S on ADE20K at 512x512: the original recipe (160k iterations of
batch 16, AdamW lr 6e-05, no layer decay, poly schedule with 1,500 warm-up iterations,
no gradient clipping, batch statistics over the whole batch as SyncBN).

    python train.py --config configs/upernet_internimage_s_512_160k_ade20k.py --workdir /ckpt/upernet_internimage_s_512_160k_ade20k \
        --config.data.dir=/data/ADEChallengeData2016 --config.init_from=/pretrained/internimage_s_1k_224.pth

``data.dir`` is the original's folder layout (images/ and annotations/, each with training/
and validation/); ``init_from`` the official ImageNet-1K classification checkpoint, which
initialises the backbone. Evaluate a published UperNet checkpoint with
``--config.mode=eval --config.init_from=upernet_internimage_s_512_160k_ade20k.pth``; multi-scale
and flip: ``--config.eval.scales="(0.5,0.75,1.0,1.25,1.5,1.75)" --config.eval.flip=True``.
Expected result: ADE20K val mIoU 50.1 single-scale, 50.9 multi-scale (the original's published
numbers; this recipe has not been run to completion here). Variants: bf16, fsdp.
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config, upernet_ade20k


def get_config(variant: str | None = None) -> ConfigDict:
  cfg = upernet_ade20k(base_config(), "s", lr=6e-05, layer_decay=1.0, clip_grad=0.0)
  return apply_variants(cfg, variant)
