"""Data sources and the grain pipeline: image folders, tfds, sharding, resumption, errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from internimage_jax.training import augment, pipeline, sources


def _write_folder(root, classes=("cat", "dog", "eel"), per_class=5, broken=("dog",)):
  """``root/{train,val}/<class>/*.jpg`` with one undecodable file per class in ``broken``."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    for c, name in enumerate(classes):
      folder = root / split / name
      folder.mkdir(parents=True)
      for i in range(per_class):
        pixels = np.full((30 + i, 40, 3), 40 * c, np.uint8) + rng.integers(0, 20, (30 + i, 40, 3),
                                                                           dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")
      if name in broken:
        (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
      (folder / "notes.txt").write_text("not an image: ignored")
  return root


def _drain_eval(source, batch, processes=1):
  example = pipeline.Classify(augment.EvalTransform(size=16), 16)
  return [list(pipeline.eval_batches(source, example, global_batch=batch,
                                     process=p, processes=processes, threads=2))
          for p in range(processes)]


def test_image_folder_labels_and_unreadable_images(tmp_path):
  root = _write_folder(tmp_path)
  train = sources.ImageFolderSource(root, "train")
  assert train.classes == ["cat", "dog", "eel"] and train.num_classes == 3
  assert len(train) == 16  # 15 images + one broken file; notes.txt is not an image
  assert sorted(set(train.labels.tolist())) == [0, 1, 2]
  broken = train.files.index(str(root / "train" / "dog" / "broken.jpg"))
  assert train[broken].image is None and train[0].image.mode == "RGB"

  # Training skips and counts it; every batch stays full.
  it = pipeline.TrainIterator(train, pipeline.Classify(augment.TrainTransform(size=16), 16),
                              global_batch=4, seed=0, process=0, processes=1, threads=2)
  batches = [next(it) for _ in range(8)]  # two epochs of 16 records
  assert all(b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.uint8 for b in batches)
  assert it.skipped >= 1  # the broken file, met at least once in two epochs
  it.close()

  # Evaluation masks it (and the padding) and flags it as unreadable.
  val = sources.ImageFolderSource(root, "val", class_root="train")
  (batches,) = _drain_eval(val, batch=6)
  valid = np.concatenate([b["valid"] for b in batches])
  unreadable = np.concatenate([b["unreadable"] for b in batches])
  assert len(valid) == 18 and valid.sum() == 15 and unreadable.sum() == 1


def test_image_folder_errors_name_the_problem(tmp_path):
  with pytest.raises(sources.DataError, match="does not exist"):
    sources.ImageFolderSource(tmp_path / "nowhere", "train")
  (tmp_path / "empty" / "train").mkdir(parents=True)
  with pytest.raises(sources.DataError, match="no class folders"):
    sources.ImageFolderSource(tmp_path / "empty", "train")
  (tmp_path / "empty" / "train" / "cat").mkdir()
  with pytest.raises(sources.DataError, match="holds no images"):
    sources.ImageFolderSource(tmp_path / "empty", "train")
  with pytest.raises(sources.DataError, match="no val/ folder"):
    sources.ImageFolderSource(tmp_path / "empty", "val", class_root="train")
  root = _write_folder(tmp_path / "odd")
  (root / "val" / "fox").mkdir()
  with pytest.raises(sources.DataError, match="fox is not a class"):
    sources.ImageFolderSource(root, "val", class_root="train")


def test_process_slices_assemble_the_global_batch_and_resume():
  digits = sources.DigitsSource("train", image_size=8)
  transform = pipeline.Classify(augment.TrainTransform(size=8, random_resized_crop=False), 8)
  kw = dict(global_batch=12, seed=3, threads=2)
  whole = pipeline.TrainIterator(digits, transform, process=0, processes=1, **kw)
  expected = [next(whole) for _ in range(3)]
  state = whole.state()
  after = next(whole)
  whole.close()
  # Two processes: each reads its half of every global batch, same pixels and labels.
  halves = [pipeline.TrainIterator(digits, transform, process=p, processes=2, **kw)
            for p in range(2)]
  for batch in expected:
    parts = [next(h) for h in halves]
    for key in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
  for h in halves:
    h.close()
  resumed = pipeline.TrainIterator(digits, transform, process=0, processes=1, state=state, **kw)
  np.testing.assert_array_equal(next(resumed)["image"], after["image"])
  resumed.close()
  # A new epoch is a new permutation of the same examples.
  epochs = pipeline.TrainIterator(digits, transform, process=0, processes=1,
                                  **dict(kw, global_batch=len(digits)))
  first, second = next(epochs)["label"], next(epochs)["label"]
  epochs.close()
  assert not np.array_equal(first, second)
  assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(digits.labels.tolist())


def test_eval_batches_cover_each_example_once_across_processes():
  test = sources.DigitsSource("test", image_size=8)
  per_process = _drain_eval(test, batch=16, processes=2)
  labels = np.concatenate([b["label"][b["valid"]] for batches in per_process for b in batches])
  assert len(labels) == len(test)
  assert sorted(labels.tolist()) == sorted(test.labels.tolist())
  assert not any(b["unreadable"].any() for batches in per_process for b in batches)


def test_batch_and_process_errors():
  digits = sources.DigitsSource("test", image_size=8)
  transform = pipeline.Classify(augment.EvalTransform(size=8), 8)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.TrainIterator(digits, transform, global_batch=8, seed=0, process=0,
                           processes=3)
  with pytest.raises(ValueError, match="exceeds the"):
    pipeline.TrainIterator(digits, transform, global_batch=10_000, seed=0,
                           process=0, processes=1)


tfds = pytest.importorskip("tensorflow_datasets")


class TinyShapes(tfds.core.GeneratorBasedBuilder):
  """A three-class tfds data set written without TensorFlow (images stored as JPEG bytes)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=3)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "validation": self._generate_examples(5)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(buffer, "JPEG")
      buffer.seek(0)
      yield i, {"image": buffer, "label": i % 3}


def test_tfds_data_source_through_grain(tmp_path):
  TinyShapes(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  train = sources.TfdsSource("tiny_shapes", "train", str(tmp_path))
  assert len(train) == 12 and train.num_classes == 3
  for i in range(len(train)):  # tfds shuffles on write: example k has height 20 + k, label k % 3
    record = train[i]
    width, height = record.image.size
    assert width == 24 and record.label == (height - 20) % 3
  it = pipeline.TrainIterator(train, pipeline.Classify(augment.TrainTransform(size=16), 16),
                              global_batch=4, seed=0, process=0, processes=1, threads=2)
  batch = next(it)
  it.close()
  assert batch["image"].shape == (4, 16, 16, 3) and set(batch["label"].tolist()) <= {0, 1, 2}
  val = sources.TfdsSource("tiny_shapes", "validation", str(tmp_path))
  (batches,) = _drain_eval(val, batch=4)
  assert sum(int(b["valid"].sum()) for b in batches) == 5

  with pytest.raises(sources.DataError, match="'no_such_set' .* is not available"):
    sources.TfdsSource("no_such_set", "train", str(tmp_path))
  with pytest.raises(sources.DataError, match="split 'test'"):
    sources.TfdsSource("tiny_shapes", "test", str(tmp_path))
  with pytest.raises(sources.DataError, match="no feature 'jpeg'"):
    sources.TfdsSource("tiny_shapes", "train", str(tmp_path), image_key="jpeg")
