"""Deformable operators with the XLA fallback and (where available) Pallas kernels."""

from pallas_kernels.dcnv3.api import dcnv3

__all__ = ["dcnv3"]
