"""Segmentation through train.py: the quickstart reaches held-out mIoU 0.5 from the
classification quickstart's run, eight fake devices match one, a killed run resumes with
the same losses, the ADE20K folder layout with bad pairs, a classification checkpoint as the
backbone's initialisation, and the recipes' optimizer rules."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (REPO, SEG_QUICKSTART, SEG_SCRATCH, metrics_rows, run_quickstart, train_env,
                     train_losses)


def run_seg(workdir, *overrides, **kwargs):
  """The segmentation quickstart from random weights: behaviour, not accuracy."""
  return run_quickstart(workdir, *overrides, command=SEG_SCRATCH, **kwargs)


def test_the_segmentation_quickstart_reaches_miou_one_half(classification_quickstart,
                                                         tmp_path):
  """The quickstart's two commands (the classification quickstart, then the segmentation
  quickstart from its run) as documented: held-out mIoU >= 0.5 (the issue's bar)."""
  classification = classification_quickstart
  work = tmp_path / "segmentation"
  result = run_quickstart(work, f"--config.init_from={classification}", command=SEG_QUICKSTART,
                          quick_codegen=False)
  assert f"init_from: backbone initialised from {classification} (125 entries)" in result.stdout
  evals = [m for m in metrics_rows(work) if "eval/miou" in m]
  assert [m["step"] for m in evals] == [150, 300]
  assert evals[-1]["eval/miou"] >= 0.5, evals
  assert 0.0 < evals[-1]["eval/macc"] <= 1.0 and 0.8 <= evals[-1]["eval/aacc"] <= 1.0
  losses = train_losses(work)
  assert losses[300] < losses[20] / 3
  assert "per-class IoU (eval; nan: class absent): 0 " in result.stdout
  assert "background 0." in result.stdout and "best eval/miou" in result.stdout


STEPWISE = ["--config.train.steps=12", "--config.log_every_steps=1",
            "--config.eval_every_steps=1000", "--config.checkpoint.every_steps=4"]


@pytest.mark.slow  # CI time; the same trainer path: test_det_train, test_reliability
def test_a_killed_segmentation_run_resumes_with_the_same_losses(tmp_path):
  reference = tmp_path / "reference"
  run_seg(reference, *STEPWISE)
  want = train_losses(reference)
  assert sorted(want) == list(range(1, 13))

  work = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, *SEG_SCRATCH, "--workdir", str(work), *STEPWISE],
                          cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not (work / "checkpoints" / "4").is_dir():
    assert proc.poll() is None and time.time() < deadline, "no checkpoint before the kill"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  result = run_seg(work, *STEPWISE)
  assert "resumed from step" in result.stdout
  got = train_losses(work)
  assert sorted(got) == sorted(want)
  for step, loss in want.items():
    assert got[step] == pytest.approx(loss, rel=1e-6), step


@pytest.mark.slow  # CI time; a dense task on a mesh: test_det_train's resume on 2 devices
def test_eight_fake_devices_match_one_for_segmentation(tmp_path):
  """Data 2 x fsdp 4: the batch statistics are over the global batch (the recipes'
  SyncBN), so the losses are one device's; evaluation gathers the same counts."""
  overrides = ["--config.train.steps=4", "--config.log_every_steps=1",
               "--config.eval_every_steps=4"]
  run_seg(tmp_path / "one", *overrides)
  run_seg(tmp_path / "eight", *overrides, "--config.mesh.data=2", "--config.mesh.fsdp=4",
          devices=8)
  one, eight = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
  assert sorted(one) == sorted(eight) == [1, 2, 3, 4]
  for step in one:
    assert eight[step] == pytest.approx(one[step], rel=1e-5), step
  evals = [[m for m in metrics_rows(tmp_path / run) if "eval/miou" in m][0]
           for run in ("one", "eight")]
  for key in ("eval/miou", "eval/macc", "eval/aacc"):  # a near-tied pixel may flip
    assert evals[1][key] == pytest.approx(evals[0][key], abs=2e-3), key


def _ade_folder(root: Path) -> Path:
  """ADEChallengeData2016's layout: 4 training and 3 validation pairs, labels 0..3 (0 =
  other), plus a training pair whose label has another size, an image without a label
  and an undecodable validation image."""
  rng = np.random.default_rng(0)
  for split, count in (("training", 4), ("validation", 3)):
    (root / "images" / split).mkdir(parents=True)
    (root / "annotations" / split).mkdir(parents=True)
    for i in range(count):
      h, w = 40 + 8 * i, 56
      Image.fromarray(rng.integers(0, 255, (h, w, 3), np.uint8)).save(
          root / "images" / split / f"ADE_{i}.jpg")
      Image.fromarray(rng.integers(0, 4, (h, w), np.uint8)).save(
          root / "annotations" / split / f"ADE_{i}.png")
  Image.fromarray(rng.integers(0, 255, (40, 56, 3), np.uint8)).save(
      root / "images" / "training" / "ADE_odd.jpg")
  Image.fromarray(np.zeros((20, 20), np.uint8)).save(root / "annotations" / "training" / "ADE_odd.png")
  Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(root / "images" / "training" / "ADE_nolabel.jpg")
  (root / "images" / "validation" / "ADE_broken.jpg").write_bytes(b"not a jpeg")
  Image.fromarray(np.zeros((40, 56), np.uint8)).save(
      root / "annotations" / "validation" / "ADE_broken.png")
  return root


def test_the_ade20k_folder_layout_skips_and_reports_bad_pairs(tmp_path):
  root = _ade_folder(tmp_path / "ade")
  common = ["--config.data.source=folder", f"--config.data.dir={root}",
            "--config.data.train_split=training", "--config.data.eval_split=validation",
            "--config.data.reduce_zero_label=True", "--config.data.image_size=32",
            "--config.data.eval_batch=4", "--config.train.global_batch=4",
            "--config.train.steps=4", "--config.eval_every_steps=4",
            "--config.eval.canvas=(64,64)", "--config.eval.label_canvas=(64,64)",
            "--config.eval.img_scale=(128,32)", "--config.aug.img_scale=(128,32)"]
  result = run_seg(tmp_path / "run", *common)
  rows = metrics_rows(tmp_path / "run")
  evals = [m for m in rows if "eval/miou" in m]
  assert evals[-1]["eval/unreadable_images"] == 1  # the undecodable validation image
  skipped = [m["train/skipped_images"] for m in rows if "train/skipped_images" in m]
  assert skipped[-1] >= 1  # the mismatched pair and the image without a label
  assert "skipped" in result.stdout
  # Problems with the folder itself are one line.
  missing = run_seg(tmp_path / "bad", *common[:1], f"--config.data.dir={tmp_path / 'nowhere'}",
                    *common[2:], check=False)
  assert missing.returncode == 1 and "Traceback" not in missing.stderr
  assert missing.stderr.startswith("error: ") and "nowhere" in missing.stderr
  small = run_seg(tmp_path / "small", "--config.mode=eval",
                  *[a.replace("label_canvas=(64,64)", "label_canvas=(32,32)") for a in common],
                  check=False)
  assert small.returncode == 1 and "label_canvas" in small.stderr, small.stderr[-2000:]


def _seg_config(name: str):
  from internimage_jax.training import config as config_lib

  spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  config_lib.validate(cfg)
  return cfg


def test_the_ade20k_recipes_schedule_and_layer_decay():
  """mmcv's poly schedule with linear warmup, unscaled LRs, and the recipes'
  ``CustomLayerDecayOptimizerConstructor`` ids (spec segmentation.md section 7)."""
  from internimage_jax.training import optim

  cfg = _seg_config("upernet_internimage_t_512_160k_ade20k").train
  lr = optim.schedule(cfg, cfg.global_batch, cfg.steps, 1263)
  for t in (0, 700, 1499, 1500, 80_000, 159_999):
    regular = 6e-5 * (1 - t / 160_000)
    want = regular * (1 - (1 - t / 1500) * (1 - 1e-6)) if t < 1500 else regular
    assert float(lr(t)) == pytest.approx(want, rel=1e-5, abs=1e-12), t
  depths, rate = (4, 4, 18, 4), 0.9
  ratios = optim.segmentation_layer_decay_ratios(depths, rate)
  n = sum(depths)
  mult = lambda name: optim.lr_multiplier(name, ratios, 1.0)  # noqa: E731
  assert mult("backbone.patch_embed.conv1.weight") == pytest.approx(rate ** (n + 1))
  assert mult("backbone.levels.0.blocks.0.dcn.offset.weight") == pytest.approx(rate ** n)
  assert mult("backbone.levels.2.blocks.17.mlp.fc1.weight") == pytest.approx(rate ** 5)
  assert mult("backbone.levels.3.blocks.3.norm1.0.weight") == pytest.approx(rate)
  assert mult("backbone.levels.1.downsample.conv.weight") == pytest.approx(rate ** (n - 8))
  assert mult("backbone.levels.3.norm.0.weight") == pytest.approx(rate ** (n - 26))
  assert mult("decode_head.conv_seg.weight") == 1.0 and mult("auxiliary_head.conv_seg.bias") == 1.0
  for name in ("l_640", "xl_640", "h_896"):  # clipping and layer decay where the original has them
    big = _seg_config(f"upernet_internimage_{name}_160k_ade20k").train
    assert big.clip_grad == 0.1 and big.lr == 2e-5 and big.layer_decay in (0.94, 0.95)


def test_a_classification_checkpoint_initialises_the_backbone(tmp_path):
  """As the original's init_cfg: the classifier is not used, T's segmentation-only layer
  scale keeps its initialisation, both reported; a segmentation checkpoint loads whole."""
  from flax import nnx

  from internimage_jax import convert, models
  from internimage_jax.training.segmentation.task import Segmentation
  from internimage_jax.training.errors import TrainingError

  cfg = _seg_config("segmentation_quickstart")
  options = cfg.model.overrides.to_dict()
  classifier = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(1),
                             **{k: v for k, v in options.items() if k != "drop_path_rate"})
  path = convert.save_safetensors(classifier, tmp_path / "cls.safetensors")
  task = Segmentation(cfg, num_classes=11)
  seg = task.build_model(rngs=nnx.Rngs(0), dtype=None)
  gamma = np.asarray(seg.backbone.levels[0].blocks.gamma1.get_value())
  lines = task.load_init(seg, str(path))
  assert lines[0].startswith(f"init_from: backbone initialised from {path}")
  assert any("kept at their initialisation" in line and "gamma1" in line for line in lines)
  assert any("not used" in line and "head.weight" in line for line in lines)
  np.testing.assert_array_equal(seg.backbone.levels[0].blocks.gamma1.get_value(), gamma)
  np.testing.assert_array_equal(seg.backbone.patch_embed.conv1.kernel.get_value(),
                                classifier.patch_embed.conv1.kernel.get_value())
  # A whole segmentor checkpoint, with another class count: only conv_seg starts afresh.
  other = Segmentation(cfg, num_classes=5).build_model(rngs=nnx.Rngs(2), dtype=None)
  whole = convert.save_safetensors(other, tmp_path / "seg.safetensors")
  lines = task.load_init(seg, str(whole))
  assert lines and "conv_seg" in lines[0]
  np.testing.assert_array_equal(seg.decode_head.bottleneck.conv.kernel.get_value(),
                                other.decode_head.bottleneck.conv.kernel.get_value())
  with pytest.raises(TrainingError, match="does not fit the backbone"):
    wide = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(1),
                         **dict(options, channels=8, groups=(1, 2, 2, 4)))
    task.load_init(seg, str(convert.save_safetensors(wide, tmp_path / "wide.safetensors")))


def test_a_train_py_run_is_a_checkpoint(tmp_path):
  """A run's workdir (its newest step) or one of its steps reads as an official-layout
  state dict through the run's model.json: for init_from, predict and convert."""
  from flax import nnx

  from internimage_jax import convert, predict
  from internimage_jax.training.segmentation.task import Segmentation

  run = tmp_path / "classification"
  run_quickstart(run, "--config.train.steps=4", "--config.checkpoint.every_steps=2",
                 "--config.eval_every_steps=100")
  assert json.loads((run / "model.json").read_text()) == {
      "task": "classification", "model": "internimage_t", "num_classes": 10,
      "options": {"channels": 16, "depths": [1, 1, 2, 1], "drop_path_rate": 0.05,
                  "groups": [1, 2, 4, 8]}}
  newest = convert.read_state_dict(run)
  step4 = convert.read_state_dict(run / "checkpoints" / "4")
  step2 = convert.read_state_dict(run / "checkpoints" / "2")
  assert sorted(newest) == sorted(step4) == sorted(step2) and "head.weight" in newest
  assert all(np.array_equal(newest[k], step4[k]) for k in newest)
  assert not np.array_equal(step2["head.weight"], step4["head.weight"])
  ema = convert.read_state_dict(run, use_ema=True)
  assert not np.array_equal(ema["head.weight"], newest["head.weight"])
  model = predict.load_model("internimage_t", run)  # options from the run's model.json
  np.testing.assert_array_equal(np.asarray(model.head.kernel.get_value()).T,
                                newest["head.weight"])
  # init_from a run: the segmentation backbone starts from the classifier's backbone.
  cfg = _seg_config("segmentation_quickstart")
  task = Segmentation(cfg, num_classes=11)
  seg = task.build_model(rngs=nnx.Rngs(0), dtype=None)
  lines = task.load_init(seg, str(run))
  assert lines[0] == f"init_from: backbone initialised from {run} (125 entries)"
  np.testing.assert_array_equal(
      convert.to_state_dict(seg.backbone)["patch_embed.conv1.weight"],
      newest["patch_embed.conv1.weight"])
  with pytest.raises(FileNotFoundError, match="not an orbax checkpoint .* nor a train.py workdir"):
    convert.read_state_dict(tmp_path)
  (run / "checkpoints" / "2").rename(tmp_path / "moved")
  (run / "checkpoints" / "4").rename(tmp_path / "moved4")
  with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
    convert.read_state_dict(run)


def test_segmentation_config_errors_name_the_key():
  from internimage_jax.training import config as config_lib

  cfg = _seg_config("segmentation_quickstart")
  cfg.model.decode_head.chanels = 8
  with pytest.raises(ValueError, match=r"model.decode_head.chanels \(did you mean "
                                        r"model.decode_head.channels\?\)"):
    config_lib.validate(cfg)
  cfg = _seg_config("segmentation_quickstart")
  cfg.eval.mode = "sliding"
  with pytest.raises(ValueError, match="config.eval.mode must be"):
    config_lib.validate(cfg)
  cfg.eval.mode, cfg.task = "whole", "tracking"
  with pytest.raises(ValueError, match="config.task must be one of"):
    config_lib.validate(cfg)
