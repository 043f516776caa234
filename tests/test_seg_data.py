"""Segmentation data: mmseg's resize rules, train/test transforms, and the sources."""

from __future__ import annotations

import io

import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from internimage_jax.training.segmentation import sources as seg_sources
from internimage_jax.training.segmentation import transforms as T
from internimage_jax.training.sources import DataError

torch = pytest.importorskip("torch")


# --- resize rules -----------------------------------------------------------------------------


def test_rescale_size_matches_mmcv_rule():
  # f = min(long/long_side, short/short_side); new = int(side * f + 0.5).
  assert T.rescale_size(683, 512, (2048, 512)) == (683, 512)  # f = min(2.998, 1.0) = 1
  assert T.rescale_size(640, 480, (3072, 768)) == (1024, 768)  # f = min(4.8, 1.6) = 1.6
  assert T.rescale_size(2000, 400, (2048, 512)) == (2048, 410)  # f = 1.024; 409.6 -> 410
  assert T.rescale_size(500, 300, (1024, 256)) == (427, 256)  # f = 0.8533; 426.67 -> 427
  assert T.rescale_size(300, 500, (2048, 512)) == (512, 853)  # portrait: h is the long side


@pytest.mark.parametrize("shape,size", [((7, 9), (20, 31)), ((40, 33), (13, 10)),
                                        ((32, 48), (16, 24)), ((5, 6), (5, 6))])
def test_resize_bilinear_matches_torch_half_pixel(shape, size):
  image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
  ours = T.resize_bilinear(image, size)
  x = torch.from_numpy(image.astype(np.float64)).permute(2, 0, 1)[None]
  ref = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False,
                                        antialias=False)[0].permute(1, 2, 0).numpy()
  ref = np.clip(np.rint(ref), 0, 255)
  assert ours.dtype == np.uint8 and ours.shape == size + (3,)
  diff = np.abs(ours.astype(int) - ref.astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.25  # OpenCV's 11-bit fixed point vs exact float
  if shape == size:
    np.testing.assert_array_equal(ours, image)  # ResizeToMultiple on a multiple: identity


def test_resize_bilinear_matches_opencv_fixed_point():
  # cv2.resize(grey, (64, 2), interpolation=cv2.INTER_LINEAR) from opencv-python 4.10 and 5.1.
  grey = np.array([[88, 159, 8, 228, 202, 27, 157], [108, 169, 212, 168, 126, 67, 173],
                   [35, 18, 182, 215, 183, 188, 173]], np.uint8)
  cv2_out = np.frombuffer(bytes.fromhex(
      "5d5d5d5d5d646b737a82899198a0998d82776c61554a3f46576778899aabbcccd3d0cdc9c6c3c0bcb9b1a19181"
      "7161514132283543515e6c798794a1a1a1a1a135353535353536363636373737384352606f7e8c9ba9b8bec0c1"
      "c3c4c6c7c9cac9c6c2bebab6b3afaba8a7a6a5a3a2a1a09f9ea0a1a3a5a6a8aaabadadadadad"),
      np.uint8).reshape(2, 64)
  np.testing.assert_array_equal(T.resize_bilinear(grey, (2, 64)), cv2_out)


def test_resize_nearest_floor_rule():
  label = np.arange(35, dtype=np.uint8).reshape(5, 7)
  out = T.resize_nearest(label, (3, 4))
  # rows floor(i * 5 / 3) = 0, 1, 3; cols floor(j * 7 / 4) = 0, 1, 3, 5
  np.testing.assert_array_equal(out, label[[0, 1, 3]][:, [0, 1, 3, 5]])
  big = T.resize_nearest(label, (11, 16))
  ref = torch.nn.functional.interpolate(torch.from_numpy(label.astype(np.float32))[None, None],
                                        size=(11, 16), mode="nearest")[0, 0].numpy()
  np.testing.assert_array_equal(big, ref.astype(np.uint8))


def test_reduce_zero_label():
  label = np.array([[0, 1, 2], [150, 255, 0]], np.uint8)
  np.testing.assert_array_equal(seg_sources.reduce_zero_label(label),
                                [[255, 0, 1], [149, 255, 255]])


def test_opencv_hsv_conversion_hand_values():
  rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [200, 100, 50]],
                 np.uint8)
  hsv = T.rgb_to_hsv_cv(rgb)
  # (200, 100, 50): s = (150 * round(255*4096/200) + 2048) >> 12 = 191, h = 20 deg / 2 = 10.
  np.testing.assert_array_equal(hsv, [[0, 255, 255], [60, 255, 255], [120, 255, 255],
                                      [0, 0, 128], [10, 191, 200]])
  np.testing.assert_array_equal(T.hsv_cv_to_rgb(hsv[:4]), rgb[:4])
  back = T.hsv_cv_to_rgb(hsv[4:]).astype(int)
  assert np.abs(back - rgb[4:]).max() <= 2  # 8-bit HSV is lossy
  # cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1] from opencv-python 4.10 (64 pixels: its
  # SIMD kernel, which truncates).
  rng = np.random.default_rng(1)
  hsv = np.stack([rng.integers(0, 181, (1, 64)), rng.integers(0, 256, (1, 64)),
                  rng.integers(0, 256, (1, 64))], -1).astype(np.uint8)
  cv2_rgb = np.frombuffer(bytes.fromhex(
      "3c696150ccd5c88aff48101f78554c373215a728b1a30d3aa9d87bc6cec5fa46d073f6b966e51c251426080a"
      "06737b772f355851b8e5cc7d2e6c1b0f93738c6c3d96e42cdd04050678517d1fac1a30735ecb73ebf3c74f7c"
      "d36776570137e2b4121111a9a4901e442a0b3e1fada1a8a9c43e36e2e31d360bdf2f1bbfabd45033230710037e"
      "c5c5abd3cf75643d2a2627201c25600d1ec18440240b51020801158bb0be839c1e2d1756368f65644911800a01"
      "00001aa262173e43718d696b511d"), np.uint8).reshape(1, 64, 3)
  np.testing.assert_array_equal(T.hsv_cv_to_rgb(hsv), cv2_rgb)


# --- train transform ------------------------------------------------------------------------


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rule_holds(label, ratio=0.75):
  classes, counts = np.unique(label, return_counts=True)
  counts = counts[classes != 255]
  return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_random_crop_cat_max_ratio():
  # 64 x 100, class 2 in columns >= 60: about 65% of 64x64 crops satisfy the rule.
  label = np.ones((64, 100), np.uint8)
  label[:, 60:] = 2
  image = _image(64, 100)
  kw = dict(crop=(64, 64), img_scale=(100, 64), ratio_range=None, flip=0.0, photometric=False)
  checked = T.SegTrainTransform(**kw)
  unchecked = T.SegTrainTransform(**kw, cat_max_ratio=1.0)
  ok = [_rule_holds(checked(image, label, np.random.default_rng(s))["label"]) for s in range(40)]
  raw = [_rule_holds(unchecked(image, label, np.random.default_rng(s))["label"]) for s in range(40)]
  assert all(ok) and not all(raw)
  # A single-class label: no crop can satisfy it, the 11th box is returned unchecked.
  out = checked(image, np.ones((64, 100), np.uint8), np.random.default_rng(0))
  assert out["label"].shape == (64, 64) and (out["label"] == 1).all()


def test_pad_with_ignore_and_size():
  image, label = _image(40, 50), np.random.default_rng(1).integers(0, 150, (40, 50)).astype(np.uint8)
  t = T.SegTrainTransform(crop=(64, 64), img_scale=(50, 40), ratio_range=None, flip=0.0,
                          photometric=False)
  out = t(Image.fromarray(image), label, np.random.default_rng(0))
  assert out["image"].shape == (64, 64, 3) and out["image"].dtype == np.uint8
  assert out["label"].shape == (64, 64) and out["label"].dtype == np.uint8
  np.testing.assert_array_equal(out["size"], [40, 50])
  assert out["size"].dtype == np.int32
  np.testing.assert_array_equal(out["image"][:40, :50], image)  # f = 1: no resize
  np.testing.assert_array_equal(out["label"][:40, :50], label)
  assert (out["image"][40:] == 0).all() and (out["image"][:, 50:] == 0).all()
  assert (out["label"][40:] == 255).all() and (out["label"][:, 50:] == 255).all()
  blank = t.blank()
  assert {k: (v.shape, v.dtype) for k, v in blank.items()} == \
         {k: (v.shape, v.dtype) for k, v in out.items()}
  assert (blank["label"] == 255).all() and (blank["size"] == 0).all()


def test_flip_moves_image_and_label_together():
  image, label = _image(48, 48), np.random.default_rng(2).integers(0, 150, (48, 48)).astype(np.uint8)
  t = T.SegTrainTransform(crop=(48, 48), img_scale=(48, 48), ratio_range=None, flip=1.0,
                          photometric=False)
  out = t(image, label, np.random.default_rng(0))
  np.testing.assert_array_equal(out["image"], image[:, ::-1])
  np.testing.assert_array_equal(out["label"], label[:, ::-1])


def test_photometric_keeps_range_and_label():
  image = _image(60, 80)
  label = np.random.default_rng(3).integers(0, 150, (60, 80)).astype(np.uint8)
  kw = dict(crop=(32, 32), img_scale=(80, 60), ratio_range=(0.5, 2.0))
  changed = 0
  for seed in range(8):
    on = T.SegTrainTransform(**kw)(image, label, np.random.default_rng(seed))
    off = T.SegTrainTransform(**kw, photometric=False)(image, label, np.random.default_rng(seed))
    assert on["image"].dtype == np.uint8
    np.testing.assert_array_equal(on["label"], off["label"])  # same crop and flip draws
    np.testing.assert_array_equal(on["size"], off["size"])
    changed += not np.array_equal(on["image"], off["image"])
  assert changed >= 6  # each of the 4 steps happens with probability 1/2


def test_train_transform_is_deterministic():
  image = _image(70, 90)
  label = np.random.default_rng(4).integers(0, 5, (70, 90)).astype(np.uint8)
  t = T.SegTrainTransform(crop=(48, 48), img_scale=(90, 70))
  a, b = (t(image, label, np.random.default_rng(7)) for _ in range(2))
  c = t(image, label, np.random.default_rng(8))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a[k], c[k]) for k in a)


# --- test transform -------------------------------------------------------------------------


def test_test_transform_sizes_fit_and_label_canvas():
  image = _image(300, 500)
  label = np.random.default_rng(5).integers(0, 150, (300, 500)).astype(np.uint8)
  t = T.SegTestTransform(img_scale=(2048, 512), canvas=(512, 1024), label_canvas=(512, 512))
  out = t(image, label)
  # keep ratio: f = min(2048/500, 512/300) -> 853 x 512, then up to multiples of 32: 864 x 512.
  np.testing.assert_array_equal(out["size"], [512, 864])
  assert not out["fitted"]
  ref = T.resize_bilinear(T.resize_bilinear(image, (512, 853)), (512, 864))
  np.testing.assert_array_equal(out["image"][:512, :864], ref)
  assert (out["image"][:, 864:] == 0).all()
  np.testing.assert_array_equal(out["label"][:300, :500], label)
  assert (out["label"][300:] == 255).all() and (out["label"][:, 500:] == 255).all()
  np.testing.assert_array_equal(out["label_size"], [300, 500])
  blank = t.blank()
  assert {k: (np.shape(v), np.asarray(v).dtype) for k, v in blank.items()} == \
         {k: (np.shape(v), np.asarray(v).dtype) for k, v in out.items()}

  half = T.SegTestTransform(img_scale=(2048, 512), canvas=(512, 1024), label_canvas=(512, 512),
                            ratio=0.5)(image, label)
  np.testing.assert_array_equal(half["size"], [256, 448])  # 427 x 256 -> 448 x 256

  small = T.SegTestTransform(img_scale=(2048, 512), canvas=(256, 512), label_canvas=(512, 512))
  fit = small(image, label)
  # 864 x 512 scaled by min(256/512, 512/864) = 0.5 -> 432 -> 416 (multiple of 32) x 256
  np.testing.assert_array_equal(fit["size"], [256, 416])
  assert fit["fitted"] and fit["image"].shape == (256, 512, 3)
  assert all(int(s) % 32 == 0 for s in fit["size"])

  tight = T.SegTestTransform(img_scale=(2048, 512), canvas=(512, 1024), label_canvas=(256, 256))
  with pytest.raises(DataError, match=r"300x500 .*config\.eval\.label_canvas"):
    tight(image, label)


# --- sources --------------------------------------------------------------------------------


def test_digit_canvases():
  train = seg_sources.DigitCanvasSource("train", size=64, length=20)
  test = seg_sources.DigitCanvasSource("test", size=64)
  assert len(train) == 20 and len(test) == 200 and train.num_classes == 11
  assert train.class_names[10] == "background" and len(train.class_names) == 11
  assert set(train.digit_ids.tolist()).isdisjoint(test.digit_ids.tolist())
  assert len(train.digit_ids) + len(test.digit_ids) == 1797
  seen = set()
  for i in range(20):
    r = train[i]
    assert r.image.mode == "RGB" and r.image.size == (64, 64)
    assert r.label.dtype == np.uint8 and r.label.shape == (64, 64)
    seen |= set(np.unique(r.label).tolist())
    for cell in (r.label[:32, :32], r.label[:32, 32:], r.label[32:, :32], r.label[32:, 32:]):
      assert len(set(np.unique(cell).tolist()) - {10, 255}) == 1  # a digit per cell
    pixels = np.asarray(r.image)
    assert (pixels == pixels[..., :1]).all()  # grey: light digits on a dark canvas
    assert pixels[r.label < 10, 0].mean() > pixels[r.label == 10, 0].mean() + 100
  assert {10, 255} <= seen and len(seen - {10, 255}) >= 5 and seen <= set(range(11)) | {255}
  again = seg_sources.DigitCanvasSource("train", size=64, length=20)
  np.testing.assert_array_equal(np.asarray(again[7].image), np.asarray(train[7].image))
  np.testing.assert_array_equal(again[7].label, train[7].label)
  assert not np.array_equal(np.asarray(train[7].image), np.asarray(test[7].image))
  assert len(train.mean) == 3 and all(0 < m < 1 for m in train.mean)
  # Both splits normalise with the training canvases' statistics.
  assert test.mean == seg_sources.DigitCanvasSource("train", size=64).mean
  cfg = ConfigDict(dict(source="digits", name="", dir="", train_split="train",
                        eval_split="validation", image_key="image", label_key="label",
                        image_size=32, test_fraction=0.2, split_seed=0, reduce_zero_label=True))
  assert seg_sources.make_seg_source(cfg, "eval")[0].label.shape == (32, 32)
  cfg.source = "nope"
  with pytest.raises(DataError, match="config.data.source"):
    seg_sources.make_seg_source(cfg, "train")


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, "PNG")
  return buffer.getvalue()


def _ade_folder(root):
  rng = np.random.default_rng(0)
  (root / "images" / "training").mkdir(parents=True)
  (root / "annotations" / "training").mkdir(parents=True)
  labels = {}
  for stem, (h, w) in {"a": (20, 30), "b": (24, 16), "c": (10, 10), "d": (12, 12)}.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "images" / "training" / f"{stem}.jpg")
    labels[stem] = rng.integers(0, 151, (h, w)).astype(np.uint8)
    labels[stem][0, 0] = 0
  (root / "images" / "training" / "d.jpg").write_bytes(b"not a jpeg")  # unreadable
  for stem in ("a", "d"):
    Image.fromarray(labels[stem]).save(root / "annotations" / "training" / f"{stem}.png")
  Image.fromarray(labels["b"][:20]).save(root / "annotations" / "training" / "b.png")  # size
  # c has no annotation
  return labels


def test_ade20k_folder_source(tmp_path):
  labels = _ade_folder(tmp_path)
  source = seg_sources.ADE20KFolderSource(tmp_path, "training")
  assert len(source) == 4 and source.num_classes == 150 and source.class_names[0] == "wall"
  records = [source[i] for i in range(4)]
  assert [r.name.endswith(f"{s}.jpg") for r, s in zip(records, "abcd")] == [True] * 4
  a = records[0]
  assert a.image.mode == "RGB" and a.image.size == (30, 20)
  np.testing.assert_array_equal(a.label, seg_sources.reduce_zero_label(labels["a"]))
  assert a.label[0, 0] == 255
  assert all(r.image is None and r.label is None for r in records[1:])
  raw = seg_sources.ADE20KFolderSource(tmp_path, "training", reduce_zero_label=False)
  np.testing.assert_array_equal(raw[0].label, labels["a"])
  assert raw.num_classes == 151 and raw.class_names[0] == "other"
  names, palette = seg_sources.ade20k_classes()
  assert len(names) == 150 and names[-1] == "flag" and palette.shape == (150, 3)
  assert palette.dtype == np.uint8 and palette[0].tolist() == [120, 120, 120]


def test_ade20k_folder_errors(tmp_path):
  with pytest.raises(DataError, match="does not exist"):
    seg_sources.ADE20KFolderSource(tmp_path / "nowhere", "training")
  (tmp_path / "images" / "validation").mkdir(parents=True)
  with pytest.raises(DataError, match="no annotations/validation/ folder"):
    seg_sources.ADE20KFolderSource(tmp_path, "validation")
  (tmp_path / "annotations" / "validation").mkdir(parents=True)
  with pytest.raises(DataError, match="holds no images"):
    seg_sources.ADE20KFolderSource(tmp_path, "validation")


tfds = pytest.importorskip("tensorflow_datasets")


class TinySceneParse(tfds.core.GeneratorBasedBuilder):
  """scene_parse150's features (JPEG image, 3-channel PNG annotation), written offline."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "annotation": tfds.features.Image(encoding_format="png")}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(6)}

  def _generate_examples(self, n):
    rng = np.random.default_rng(n)
    for i in range(n):
      h, w = 10 + i, 14
      annotation = rng.integers(0, 151, (h, w, 3)).astype(np.uint8)
      annotation[..., 0] = i  # R: the class; G/B: instance ids
      jpeg = io.BytesIO()
      Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(jpeg, "JPEG")
      # Encoded bytes: tfds encodes arrays with TensorFlow, which is not installed.
      yield i, {"image": io.BytesIO(jpeg.getvalue()), "annotation": io.BytesIO(_png(annotation))}


def test_tfds_seg_source(tmp_path):
  TinySceneParse(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  source = seg_sources.TfdsSegSource("tiny_scene_parse", "train", str(tmp_path))
  assert len(source) == 6 and source.num_classes == 150
  for i in range(len(source)):
    r = source[i]
    k = r.image.size[1] - 10  # example k has height 10 + k and class k everywhere
    assert r.label.shape == (10 + k, 14) and r.label.dtype == np.uint8
    assert (r.label == (255 if k == 0 else k - 1)).all()
  with pytest.raises(DataError, match="tfds build no_such_set"):
    seg_sources.TfdsSegSource("no_such_set", "train", str(tmp_path))
  with pytest.raises(DataError, match="no feature 'label'"):
    seg_sources.TfdsSegSource("tiny_scene_parse", "train", str(tmp_path), label_key="label")
