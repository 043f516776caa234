"""Object detection: Mask R-CNN on InternImage, as mmdetection computes it (spec
``detection.md``): anchors, the box coder, NMS, the FPN neck, the RPN head and its
proposals, RoI features, the box head and its detections, the mask head and mask
pasting, the training targets and losses (``losses.py``), and the detector
(``create_detector``: inference and ``loss``). Training through ``train.py`` is not
there yet."""

from internimage_jax.models.detection.boxes import anchors, compact, decode, encode, iou, nms
from internimage_jax.models.detection.detector import (
    DETECTORS, MaskRCNN, RoIHead, create_detector)
from internimage_jax.models.detection.fpn import FPN, PlainConvModule, upsample_nearest
from internimage_jax.models.detection.roi_head import (
    FCNMaskHead, Shared2FCBBoxHead, detect, extract_rois, paste_masks, roi_levels)
from internimage_jax.models.detection.rpn import RPNHead, proposals

__all__ = ["DETECTORS", "FPN", "FCNMaskHead", "MaskRCNN", "PlainConvModule", "RPNHead",
           "RoIHead", "Shared2FCBBoxHead", "create_detector", "anchors", "compact", "decode",
           "detect", "encode", "extract_rois", "iou", "nms", "paste_masks", "proposals",
           "roi_levels", "upsample_nearest"]
