"""Deformable operators with the XLA fallback and (where available) Pallas kernels."""

from internimage_jax.ops.deform import deform_conv2d
from internimage_jax.ops.roi import deform_roi_pool, ps_roi_align, ps_roi_pool, roi_align, roi_pool
from pallas_kernels.dcnv3.api import dcnv3

__all__ = ["dcnv3", "deform_conv2d", "deform_roi_pool", "ps_roi_align", "ps_roi_pool",
           "roi_align", "roi_pool"]
