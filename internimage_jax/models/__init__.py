"""Flax NNX models: InternImage and its DCNv3 module, the other deformable modules, and
the UperNet segmentor."""

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.design import scale, stacking_rule
from internimage_jax.models.deform import DeformConv2d, DeformRoIPool, ModulatedDeformConv2d
from internimage_jax.models.internimage import InternImage
from internimage_jax.models.segmentation import FCNHead, Segmentor, UperHead, create_segmentor
from internimage_jax.models.variants import IMAGE_SIZES, VARIANTS, create

__all__ = ["DCNv3", "DeformConv2d", "DeformRoIPool", "FCNHead", "IMAGE_SIZES", "InternImage",
           "ModulatedDeformConv2d", "Segmentor", "UperHead", "VARIANTS", "create",
           "create_segmentor", "scale", "stacking_rule"]
