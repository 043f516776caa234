"""DCNv3 deformable sampling: public API, static parameters and the XLA fallback."""

from pallas_kernels.dcnv3.api import IMPLEMENTATIONS, dcnv3
from pallas_kernels.dcnv3.params import DCNv3Params
from pallas_kernels.dcnv3.reference import dcnv3_xla

__all__ = ["IMPLEMENTATIONS", "DCNv3Params", "dcnv3", "dcnv3_xla"]
