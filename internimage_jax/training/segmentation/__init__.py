"""Semantic-segmentation data: sources (ADE20K folder, tfds, digit canvases) and mmseg transforms."""
