"""UperNet + InternImage-H on ADE20K at 896x896: the original recipe (160k iterations of
batch 16, AdamW lr 2e-05, layer decay 0.95, poly schedule with 1,500 warm-up iterations,
gradient clipping at 0.1, batch statistics over the whole batch as SyncBN).

    python train.py --config configs/upernet_internimage_h_896_160k_ade20k.py --workdir /ckpt/upernet_internimage_h_896_160k_ade20k \
        --config.data.dir=/data/ADEChallengeData2016 --config.init_from=/pretrained/internimage_h_jointto22k_384.pth

``data.dir`` is the original's folder layout (images/ and annotations/, each with training/
and validation/); ``init_from`` the official joint 427M -> ImageNet-22K classification checkpoint, which
initialises the backbone. Evaluate a published UperNet checkpoint with
``--config.mode=eval --config.init_from=upernet_internimage_h_896_160k_ade20k.pth``; multi-scale
and flip: ``--config.eval.scales="(0.5,0.75,1.0,1.25,1.5,1.75)" --config.eval.flip=True``.
Expected result: ADE20K val mIoU 59.9 single-scale, 60.3 multi-scale (the original's published
numbers; this recipe has not been run to completion here). Variants: bf16, fsdp.
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config, upernet_ade20k


def get_config(variant: str | None = None) -> ConfigDict:
  cfg = upernet_ade20k(base_config(), "h", lr=2e-05, layer_decay=0.95, clip_grad=0.1)
  return apply_variants(cfg, variant)
