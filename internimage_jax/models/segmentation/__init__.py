"""Semantic segmentation: InternImage + UperNet, as mmsegmentation computes it."""

from internimage_jax.models.segmentation.heads import (
    ConvModule, FCNHead, PoolingBranch, UperHead, adaptive_avg_pool, resize)
from internimage_jax.models.segmentation.segmentor import (
    SEGMENTORS, Segmentor, create_segmentor, cross_entropy)

__all__ = ["SEGMENTORS", "ConvModule", "FCNHead", "PoolingBranch", "Segmentor", "UperHead",
           "adaptive_avg_pool", "create_segmentor", "cross_entropy", "resize"]
