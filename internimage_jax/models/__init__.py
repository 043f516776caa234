"""Flax NNX models: InternImage and its DCNv3 module, the other deformable modules, the
UperNet segmentor and the Mask R-CNN detector."""

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.design import scale, stacking_rule
from internimage_jax.models.deform import DeformConv2d, DeformRoIPool, ModulatedDeformConv2d
from internimage_jax.models.internimage import InternImage
from internimage_jax.models.detection import DETECTORS, MaskRCNN, create_detector
from internimage_jax.models.segmentation import FCNHead, Segmentor, UperHead, create_segmentor
from internimage_jax.models.variants import IMAGE_SIZES, VARIANTS, create

__all__ = ["DCNv3", "DETECTORS", "DeformConv2d", "DeformRoIPool", "FCNHead", "IMAGE_SIZES",
           "InternImage", "MaskRCNN", "ModulatedDeformConv2d", "Segmentor", "UperHead", "VARIANTS",
           "create", "create_detector", "create_segmentor", "scale", "stacking_rule"]
