"""Mask R-CNN + InternImage-S on COCO 2017, the original 1x recipe: 12 epochs, lr x0.1 after
epochs 8 and 11, resize to fit (1333, 800), flip; batch 16, AdamW lr 1e-4, weight decay
0.05, 500 warm-up iterations, backbone from the ImageNet-1K classifier (``in1k``).

    python train.py --config configs/mask_rcnn_internimage_s_fpn_1x_coco.py \\
        --workdir /ckpt/mask_rcnn_internimage_s_fpn_1x_coco --config.data.dir=/data/coco

``data.dir`` is COCO's folder layout (train2017/, val2017/, annotations/instances_*.json);
``:tfds`` reads tfds's coco/2017 images instead, with ``--config.data.annotations=`` the
folder of instances_*.json (tfds's COCO has no instance masks). Evaluate the published
checkpoint: ``--config.mode=eval --config.init_from=coco_1x``. Expected result: COCO
val2017 box / mask AP 47.8 / 43.3 (the original's published numbers; this recipe has not been
run to completion here). Variants: bf16, fsdp, tfds.
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config, mask_rcnn_coco


def get_config(variant: str | None = None) -> ConfigDict:
  return apply_variants(mask_rcnn_coco(base_config(), "s", "1x"), variant)
