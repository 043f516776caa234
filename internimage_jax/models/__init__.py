"""Flax NNX models: InternImage and its DCNv3 module, and the other deformable modules."""

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.deform import DeformConv2d, DeformRoIPool, ModulatedDeformConv2d
from internimage_jax.models.internimage import InternImage
from internimage_jax.models.variants import IMAGE_SIZES, VARIANTS, create

__all__ = ["DCNv3", "DeformConv2d", "DeformRoIPool", "IMAGE_SIZES", "InternImage",
           "ModulatedDeformConv2d", "VARIANTS", "create"]
