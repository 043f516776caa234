"""Published weights by name (``pretrained=``), offline: a Hugging Face cache laid out as
``hf_hub_download`` leaves it, made from the golden checkpoints; verified and converted
once; the errors a user meets. No test downloads anything."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from helpers import MINI_T, require_golden
from internimage_jax import convert, models

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SEG_OPTIONS = dict(num_classes=7, backbone=dict(MINI_T, drop_path_rate=0.0),
                   decode_head=dict(channels=32), auxiliary_head=dict(channels=16))


def _hub_cache(cache: Path, files: dict[str, Path]) -> Path:
  """``files`` (hub name -> local file) in the cache of ``OpenGVLab/InternImage`` at one
  commit, as the hub library stores them: blobs named by their SHA-256, the snapshot's
  links to them, ``refs/main``. Returns the snapshot directory."""
  repo = cache / "models--OpenGVLab--InternImage"
  snapshot = repo / "snapshots" / COMMIT
  for folder in (repo / "refs", repo / "blobs", snapshot):
    folder.mkdir(parents=True)
  (repo / "refs" / "main").write_text(COMMIT)
  for name, source in files.items():
    data = source.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    (repo / "blobs" / sha).write_bytes(data)
    (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / sha)
  return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
  """An empty hub cache, offline (``HF_HUB_OFFLINE=1``), and an empty weights folder."""
  from huggingface_hub import constants

  cache = tmp_path / "hub"
  for env, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(cache)),
                     ("INTERNIMAGE_JAX_WEIGHTS", str(tmp_path / "weights"))):
    monkeypatch.setenv(env, value)
  # The hub library reads its environment once, at import.
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
  return cache


def _assert_same_weights(module, state_dict):
  """Every backbone entry of ``state_dict`` (and every other one ``module`` has) equal."""
  got = convert.to_state_dict(module)
  backbone = [k for k in state_dict if k.startswith(("patch_embed.", "levels.", "backbone."))]
  assert backbone and all(k in got for k in backbone)
  for key, value in state_dict.items():
    if key in got:
      np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_published_weights_load_by_name_from_the_hub_cache(offline_hub, monkeypatch,
                                                           tmp_path):
  golden = require_golden()
  snapshot = _hub_cache(offline_hub, {
      "internimage_t_1k_224.pth": golden / "model_mini_t.pth",
      "upernet_internimage_t_512_160k_ade20k.pth": golden / "seg_mini_t.pth"})
  classifier = convert.read_state_dict(golden / "model_mini_t.pth")
  segmentor = convert.read_state_dict(golden / "seg_mini_t.pth")

  model = models.create("internimage_t", pretrained="in1k", **MINI_T)
  assert model.num_classes == 10  # the checkpoint's head
  _assert_same_weights(model, classifier)
  assert (snapshot / "internimage_t_1k_224.pth.safetensors").is_file()  # converted once
  with pytest.warns(UserWarning, match=r"newly initialised: head\.bias, head\.weight"):
    five = models.create("internimage_t", pretrained="in1k", num_classes=5, **MINI_T)
  assert five.num_classes == 5
  backbone = models.create("internimage_t", pretrained="in1k", features_only=True, **MINI_T)
  _assert_same_weights(backbone, classifier)

  # The UperNet checkpoint: whole, or its backbone (with the segmentor's backbone options).
  seg = models.create_segmentor("upernet_internimage_t", pretrained="ade20k", **SEG_OPTIONS)
  _assert_same_weights(seg, segmentor)
  seg_backbone = models.create("internimage_t", pretrained="ade20k", features_only=True,
                               **MINI_T)
  _assert_same_weights(seg_backbone, {k[len("backbone."):]: v for k, v in segmentor.items()
                                      if k.startswith("backbone.")})

  # train.py's init_from takes a tag of the run's backbone too.
  from internimage_jax.training.segmentation.task import Segmentation
  from internimage_jax.training.tasks import Classification

  copy = snapshot / "internimage_t_1k_224.pth.safetensors"
  for task, name in ((Classification, "internimage_t"), (Segmentation, "upernet_internimage_t")):
    cfg = ConfigDict(dict(model=dict(name=name)))
    assert task(cfg, num_classes=3).init_path("in1k") == str(copy)
    assert task(cfg, num_classes=3).init_path("/some/file.pth") == "/some/file.pth"

  # Later loads read the converted copy: no torch needed.
  monkeypatch.setitem(sys.modules, "torch", None)
  _assert_same_weights(models.create("internimage_t", pretrained="in1k", **MINI_T), classifier)
  # A path is a checkpoint as it is: a file, or a converted directory (via its model.json).
  _assert_same_weights(models.create("internimage_t", pretrained=copy, **MINI_T), classifier)
  converted = convert.save_orbax(model, tmp_path / "converted", {
      "model": "internimage_t", "num_classes": 10, "options": MINI_T})
  _assert_same_weights(models.create("internimage_t", pretrained=converted),  # model.json
                       classifier)


def test_published_weights_errors_name_the_fix(offline_hub, tmp_path, monkeypatch):
  from internimage_jax import predict
  from internimage_jax.training.errors import TrainingError
  from internimage_jax.training.tasks import Classification

  golden = require_golden()
  snapshot = _hub_cache(offline_hub, {
      "internimage_b_1k_224.pth": golden / "model_mini_t.pth",
      "internimage_s_1k_224.pth": golden / "model_mini_t.pth",
      "upernet_internimage_t_512_160k_ade20k.pth": golden / "seg_mini_t.pth"})
  # A cache where the converted copy cannot be written: the .pth itself serves; and a tag
  # wins over a folder of the same name in the working directory.
  def refuse(*args, **kwargs):
    raise RuntimeError("read-only file system")

  with monkeypatch.context() as patch:
    patch.chdir(tmp_path)
    (tmp_path / "in1k").mkdir()
    patch.setattr("safetensors.numpy.save_file", refuse)
    options = dict(MINI_T, post_norm=False, layer_scale=None)  # S's options, undone
    _assert_same_weights(models.create("internimage_s", pretrained="in1k", **options),
                         convert.read_state_dict(golden / "model_mini_t.pth"))
    assert not list(snapshot.glob("*.safetensors*"))
  # A tag of the other kind, for predict and train.py.
  with pytest.raises(ValueError, match="is a segmentor's checkpoint; pass --task segmentation"):
    predict.load_model("internimage_t", "ade20k")
  with pytest.raises(ValueError, match="is a classification checkpoint; the UperNet's is"):
    predict.load_segmentor("upernet_internimage_t", "in1k")
  cfg = ConfigDict(dict(model=dict(name="internimage_t")))
  with pytest.raises(TrainingError, match="is a segmentor's checkpoint"):
    Classification(cfg, num_classes=3).init_path("ade20k")

  with pytest.raises(FileNotFoundError) as missing:
    models.create("internimage_xl", pretrained="22kto1k")
  message = str(missing.value)
  placed = tmp_path / "weights" / "internimage_xl_22kto1k_384.pth"
  assert "\n" not in message and "Hugging Face repository OpenGVLab/InternImage" in message
  assert f"place it at {placed}" in message and "internimage_xl_22kto1k_384.pth" in message
  assert ("https://huggingface.co/OpenGVLab/InternImage/resolve/main/"
          "internimage_xl_22kto1k_384.pth" in message)
  # A copy placed there by hand serves (here the mini T, loaded as T with its options).
  placed.parent.mkdir()
  shutil.copy(golden / "model_mini_t.pth", tmp_path / "weights" / "internimage_t_1k_224.pth")
  models.create("internimage_t", pretrained="in1k", **MINI_T)

  blob = (snapshot / "internimage_b_1k_224.pth").resolve()
  damaged = bytearray(blob.read_bytes())
  damaged[len(damaged) // 2] ^= 0xFF
  blob.write_bytes(bytes(damaged))
  with pytest.raises(OSError, match=r"internimage_b_1k_224.pth in the Hugging Face cache is "
                                    r"corrupt .* delete .* to download it anew"):
    models.create("internimage_b", pretrained="in1k", **MINI_T)

  with pytest.raises(ValueError, match=r"no published weights 'in22k' for internimage_t and "
                                       r"no file of that name; choose one of "
                                       r"\['ade20k', 'coco_1x', 'coco_3x', 'in1k'\]"):
    models.create("internimage_t", pretrained="in22k")
  with pytest.raises(ValueError, match="is a classification checkpoint"):
    models.create_segmentor("upernet_internimage_t", pretrained="in1k", **SEG_OPTIONS)
  # Weights of another size: the backbone's mismatches, named.
  with pytest.raises(convert.CheckpointMismatchError, match=r"does not fit InternImage:\n"
                                                            r"  shape mismatch"):
    models.create("internimage_t", pretrained=golden / "model_mini_t.pth",
                  **dict(MINI_T, channels=32, groups=(2, 4, 8, 16)))


# A tiny Mask R-CNN (det_mini_t's heads, one block per level).
DET_OPTIONS = dict(num_classes=3, backbone=dict(channels=16, depths=(1, 1, 1, 1),
                                                groups=(1, 2, 4, 8), drop_path_rate=0.0),
                   neck=dict(out_channels=32),
                   roi_head=dict(bbox_roi_extractor=dict(finest_scale=16),
                                 bbox_head=dict(fc_out_channels=64),
                                 mask_roi_extractor=dict(finest_scale=16),
                                 mask_head=dict(conv_out_channels=32)))


def test_published_detectors_are_the_mask_rcnn_coco_checkpoints():
  from internimage_jax import pretrained

  for size in ("t", "s", "b"):
    table = pretrained.PUBLISHED[f"internimage_{size}"]
    assert pretrained.tags_holding(f"internimage_{size}", "detector") == ["coco_1x", "coco_3x"]
    for schedule in ("1x", "3x"):
      entry = table[f"coco_{schedule}"]
      assert entry.holds == "detector" and entry.num_classes == 80 and entry.image_size == 800
      assert entry.filename == f"mask_rcnn_internimage_{size}_fpn_{schedule}_coco.pth"
      assert entry.url == ("https://huggingface.co/OpenGVLab/InternImage/resolve/main/"
                           f"mask_rcnn_internimage_{size}_fpn_{schedule}_coco.pth")
    assert table["in1k"].holds == "classifier" and table["ade20k"].holds == "segmentor"
  # No published Mask R-CNN for the larger sizes (their COCO models are Cascade / DINO).
  assert all(e.holds != "detector" for m in ("internimage_l", "internimage_xl", "internimage_h",
                                             "internimage_g")
             for e in pretrained.PUBLISHED[m].values())


def test_create_detector_loads_a_checkpoint_strictly_and_refuses_other_kinds(offline_hub,
                                                                             tmp_path):
  from internimage_jax.models.detection import create_detector

  source = create_detector("mask_rcnn_internimage_t", rngs=nnx.Rngs(1), **DET_OPTIONS)
  weights = convert.to_state_dict(source)
  path = convert.save_safetensors(source, tmp_path / "det.safetensors")
  for given in (path, str(path)):
    det = create_detector("mask_rcnn_internimage_t", pretrained=given, **DET_OPTIONS)
    got = convert.to_state_dict(det)
    assert sorted(got) == sorted(weights)
    assert any(k.startswith("roi_head.mask_head.") for k in got)
    for key, value in weights.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)
  # Strict: another class count does not fit.
  with pytest.raises(convert.CheckpointMismatchError, match="shape mismatch"):
    create_detector("mask_rcnn_internimage_t", pretrained=path,
                    **dict(DET_OPTIONS, num_classes=4))
  with pytest.raises(FileNotFoundError, match="create_detector: checkpoint not found"):
    create_detector("mask_rcnn_internimage_t", pretrained=tmp_path / "none.safetensors",
                    **DET_OPTIONS)
  # A tag of another kind, refused before anything is downloaded (the hub is offline and
  # empty); a tag the model lacks names the choices.
  for tag, kind in (("in1k", "classifier"), ("ade20k", "segmentor")):
    with pytest.raises(ValueError, match=rf"^create_detector: pretrained '{tag}' is a "
                                         rf"{kind}'s checkpoint \(.*\.pth\); the Mask "
                                         r"R-CNN's are \['coco_1x', 'coco_3x'\]$"):
      create_detector("mask_rcnn_internimage_t", pretrained=tag, **DET_OPTIONS)
  with pytest.raises(ValueError, match=r"no published weights 'in22k' for internimage_s"):
    create_detector("mask_rcnn_internimage_s", pretrained="in22k")
  with pytest.raises(FileNotFoundError, match=r"mask_rcnn_internimage_b_fpn_3x_coco\.pth"):
    create_detector("mask_rcnn_internimage_b", pretrained="coco_3x")


def test_published_detector_loads_by_tag_from_the_hub_cache(offline_hub):
  """The mmdet golden (det_mini_t, the published files' layout) as the hub's COCO file."""
  from internimage_jax.models.detection import create_detector

  golden = require_golden()
  snapshot = _hub_cache(offline_hub, {
      "mask_rcnn_internimage_t_fpn_1x_coco.pth": golden / "det_mini_t.pth"})
  options = dict(DET_OPTIONS, backbone=dict(DET_OPTIONS["backbone"], depths=(1, 1, 2, 1)))
  det = create_detector("mask_rcnn_internimage_t", pretrained="coco_1x", **options)
  want = convert.read_state_dict(golden / "det_mini_t.pth")
  got = convert.to_state_dict(det)
  assert sorted(got) == sorted(want)
  for key, value in want.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)
  assert (snapshot / "mask_rcnn_internimage_t_fpn_1x_coco.pth.safetensors").is_file()
