"""Flax NNX InternImage models."""

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.internimage import InternImage
from internimage_jax.models.variants import IMAGE_SIZES, VARIANTS, create

__all__ = ["DCNv3", "IMAGE_SIZES", "InternImage", "VARIANTS", "create"]
from internimage_jax.models.deform import (  # noqa: E402
    DeformConv2d, DeformRoIPool, ModulatedDeformConv2d)

__all__ += ["DeformConv2d", "DeformRoIPool", "ModulatedDeformConv2d"]
