"""Detection and instance-segmentation data (COCO folder, tfds coco/2017, digit canvases),
mmdet's transforms, and the Mask R-CNN training task with COCO evaluation."""
