"""Input pipelines with a checkpointable position.

``DigitsData`` is the offline data set of the quickstart: scikit-learn's 1,797
handwritten digits (8x8, 10 classes), upsampled to the model's image size, with a
fixed held-out split. Iteration order is a pure function of (seed, epoch), so the
position ``(epoch, index)`` saved in a checkpoint reproduces the same batches.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from PIL import Image


@dataclasses.dataclass
class IteratorState:
  """Where the training iterator stands: saved with every checkpoint."""

  epoch: int = 0
  index: int = 0  # first example of the next batch within the epoch's order

  def to_dict(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  @classmethod
  def from_dict(cls, d) -> "IteratorState":
    return cls(int(d["epoch"]), int(d["index"]))


def _upsample(images: np.ndarray, size: int) -> np.ndarray:
  """``[N, h, w]`` grey images in [0, 1] -> ``[N, size, size, 3]`` float32 (bilinear)."""
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(images):
    big = Image.fromarray(image.astype(np.float32), mode="F").resize(
        (size, size), Image.Resampling.BILINEAR)
    out[i] = np.asarray(big, np.float32)[..., None]
  return out


class DigitsData:
  """scikit-learn digits as ``(images NHWC, labels)``, normalised to mean 0, std 1."""

  num_classes = 10

  def __init__(self, image_size: int = 32, test_fraction: float = 0.2, split_seed: int = 0):
    try:
      from sklearn.datasets import load_digits
    except ImportError as e:
      raise ImportError("the digits data set needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    images = _upsample(digits.images / 16.0, image_size)
    images = (images - images.mean()) / images.std()
    labels = digits.target.astype(np.int32)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = order[:n_test], order[n_test:]
    self.train = (images[train], labels[train])
    self.test = (images[test], labels[test])


class EpochIterator:
  """Shuffled batches of one process's share of the data, resumable from its state.

  Every process draws the same global permutation of each epoch and takes its own
  contiguous slice of each global batch, so the global batch is identical whatever
  the number of processes. Incomplete last batches are dropped.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, global_batch: int, seed: int,
               state: IteratorState | None = None):
    if global_batch % jax.process_count():
      raise ValueError(f"global batch {global_batch} is not divisible by the "
                       f"{jax.process_count()} processes")
    if global_batch > len(labels):
      raise ValueError(f"global batch {global_batch} exceeds the {len(labels)} training examples")
    self.images, self.labels = images, labels
    self.global_batch = global_batch
    self.seed = seed
    self.state = state or IteratorState()
    self.steps_per_epoch = len(labels) // global_batch

  def _order(self, epoch: int) -> np.ndarray:
    # Drawn once per epoch (not per batch): a full permutation is O(examples).
    if getattr(self, "_cached_epoch", None) != epoch:
      self._cached_order = np.random.default_rng([self.seed, epoch]).permutation(len(self.labels))
      self._cached_epoch = epoch
    return self._cached_order

  def __iter__(self):
    return self

  def __next__(self) -> tuple[np.ndarray, np.ndarray]:
    if self.state.index + self.global_batch > len(self.labels):
      self.state = IteratorState(self.state.epoch + 1, 0)
    order = self._order(self.state.epoch)
    batch = order[self.state.index:self.state.index + self.global_batch]
    self.state = IteratorState(self.state.epoch, self.state.index + self.global_batch)
    per_process = self.global_batch // jax.process_count()
    mine = batch[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    return self.images[mine], self.labels[mine]


def eval_batches(images: np.ndarray, labels: np.ndarray, batch: int):
  """Fixed-size batches over a whole split; the last is padded, with a validity mask."""
  for start in range(0, len(labels), batch):
    x, y = images[start:start + batch], labels[start:start + batch]
    valid = np.ones(len(y), bool)
    if len(y) < batch:
      pad = batch - len(y)
      x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      y = np.concatenate([y, np.zeros(pad, y.dtype)])
      valid = np.concatenate([valid, np.zeros(pad, bool)])
    yield x, y, valid
