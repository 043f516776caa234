"""Mask R-CNN + InternImage-T on COCO 2017, the original 3x recipe: 36 epochs, lr x0.1 after
epochs 27 and 33, multi-scale (short side 480-800) with random crops, flip; batch 16, AdamW
lr 1e-4, weight decay 0.05, 500 warm-up iterations, backbone from the ImageNet-1K classifier
(``in1k``).

    python train.py --config configs/mask_rcnn_internimage_t_fpn_3x_coco.py \\
        --workdir /ckpt/mask_rcnn_internimage_t_fpn_3x_coco --config.data.dir=/data/coco

``data.dir`` is COCO's folder layout (train2017/, val2017/, annotations/instances_*.json);
``:tfds`` reads tfds's coco/2017 images instead, with ``--config.data.annotations=`` the
folder of instances_*.json (tfds's COCO has no instance masks). Evaluate the published
checkpoint: ``--config.mode=eval --config.init_from=coco_3x``. Expected result: COCO
val2017 box / mask AP 49.1 / 43.7 (the original's published numbers; this recipe has not been
run to completion here). Variants: bf16, fsdp, tfds.
"""

from ml_collections import ConfigDict

from internimage_jax.training.config import apply_variants, base_config, mask_rcnn_coco


def get_config(variant: str | None = None) -> ConfigDict:
  return apply_variants(mask_rcnn_coco(base_config(), "t", "3x"), variant)
