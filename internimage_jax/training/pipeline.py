"""grain input pipelines: per-process shards of global batches, resumable, prefetched.

The training stream is a per-epoch reshuffle of the source (``shuffle().repeat()``).
Each process reads only its own contiguous slice of every global batch, so the global
batch -- the concatenation of the processes' slices in process order -- is the same
whatever the number of processes. Augmentation randomness is keyed by the example's
position in the global stream, so it too is independent of processes and threads.
The iterator state (a small dict) goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import grain
import numpy as np
from PIL import Image

from internimage_jax.training.sources import Record

Transform = Callable[[Image.Image, np.random.Generator], np.ndarray]


class _ProcessSlice(grain.MapDataset):
  """Element ``k`` of this process = the global stream's element at the same offset
  within this process's slice of the same global batch; yields ``(global_index, record)``.

  ``size`` (when given) marks global indices at or past it as padding (``None``).
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, process: int,
               processes: int, size: int | None = None):
    super().__init__(parent)
    self._local = global_batch // processes
    self._global, self._process, self._size = global_batch, process, size
    self._length = len(parent) // processes

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, offset = divmod(index, self._local)
    g = batch * self._global + self._process * self._local + offset
    if self._size is not None and g >= self._size:
      return g, None
    return g, self._parent[g]

  def __str__(self) -> str:
    return f"_ProcessSlice(process={self._process}, local={self._local})"


class Example(Protocol):
  """A task's per-example preparation: ``(record, rng) -> dict`` of fixed-shape arrays,
  and ``blank()``, the same arrays for padding and unreadable records."""

  def __call__(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]: ...

  def blank(self) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass
class Classify:
  """Classification examples: ``{"image": uint8 [S, S, 3], "label": int32}``."""

  transform: Transform
  size: int

  def __call__(self, record: Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"image": self.transform(record.image, rng), "label": np.int32(record.label)}

  def blank(self) -> dict[str, np.ndarray]:
    return {"image": np.zeros((self.size, self.size, 3), np.uint8), "label": np.int32(0)}


@dataclasses.dataclass
class _Prepare:
  """``(global_index, record)`` -> the example's arrays with ``"ok"`` and ``"padding"``."""

  example: Example
  seed: int

  def __call__(self, item: tuple[int, Record | None]) -> dict[str, Any]:
    g, record = item
    if record is None or record.image is None:
      return {**self.example.blank(), "ok": False, "padding": record is None}
    rng = np.random.default_rng([self.seed, g])
    return {**self.example(record, rng), "ok": True, "padding": False}


class _SkipUnreadable(grain.IterDataset):
  """Drops examples whose image could not be decoded; the next kept example carries how
  many were dropped before it (``"skipped"``), so batches count them exactly -- a
  counter in the producer would also count what prefetching has read ahead."""

  def __iter__(self) -> "_SkipUnreadableIterator":
    return _SkipUnreadableIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return "_SkipUnreadable"


class _SkipUnreadableIterator(grain.DatasetIterator):
  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      example = next(self._parent)
      if example.pop("ok"):
        del example["padding"]
        return {**example, "skipped": np.int32(skipped)}
      skipped += 1

  # Stateless between elements: the position is the parent's.
  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def _check_batch(global_batch: int, processes: int) -> None:
  if global_batch % processes:
    raise ValueError(f"global batch {global_batch} is not divisible by the {processes} processes")


class TrainIterator:
  """Endless local batches of ``example``'s arrays (classification: ``{"image": uint8
  [B, S, S, 3], "label": int32 [B]}``).

  ``state()`` / ``TrainIterator(..., state=...)`` save and restore the position (and the
  count of skipped images) so a resumed run sees exactly the batches it would have.
  ``skipped`` counts the unreadable images met by the batches returned so far.
  """

  def __init__(self, source, example: Example, *, global_batch: int, seed: int, process: int, processes: int, threads: int = 8, prefetch: int = 2,
               state: dict[str, Any] | None = None):
    _check_batch(global_batch, processes)
    if global_batch > len(source):
      raise ValueError(f"global batch {global_batch} exceeds the {len(source)} training examples")
    self.skipped = int(state["skipped"]) if state else 0
    stream = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    stream = _ProcessSlice(stream, global_batch, process, processes)
    stream = stream.map(_Prepare(example, seed))
    # Worker threads decode and augment ahead of the consumer; Pillow releases the GIL.
    examples = stream.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                        prefetch_buffer_size=4 * threads))
    batches = _SkipUnreadable(examples).batch(global_batch // processes, drop_remainder=True)
    if prefetch:  # whole batches ready on the host while the device computes
      batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
    self._iterator = iter(batches)
    if state:
      self._iterator.set_state(state["grain"])

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = dict(next(self._iterator))
    self.skipped += int(batch.pop("skipped").sum())
    return batch

  def state(self) -> dict[str, Any]:
    return {"grain": self._iterator.get_state(), "skipped": self.skipped}

  def close(self) -> None:
    """Stops the prefetch threads."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def eval_batches(source, example: Example, *, global_batch: int, process: int,
                 processes: int, threads: int = 8):
  """One pass over a split in fixed-size local batches, with ``"valid"`` masking the
  padding of the last global batch and any unreadable image (flagged in ``"unreadable"``)."""
  _check_batch(global_batch, processes)
  padded = -(-len(source) // global_batch) * global_batch
  indices = grain.MapDataset.source(_Padded(source, padded))
  stream = _ProcessSlice(indices, global_batch, process, processes, size=len(source))
  stream = stream.map(_Prepare(example, seed=0))
  examples = stream.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                      prefetch_buffer_size=4 * threads))
  for batch in examples.batch(global_batch // processes, drop_remainder=False):
    batch = dict(batch)
    ok, padding = batch.pop("ok"), batch.pop("padding")
    yield {**batch, "valid": ok, "unreadable": ~ok & ~padding}


class _Padded:
  """A source seen with ``length`` >= its size; indices past the end are never read
  (``_ProcessSlice`` turns them into padding)."""

  def __init__(self, source, length: int):
    self._source, self._length = source, length

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> Record:
    return self._source[index]
