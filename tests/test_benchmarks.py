"""The benchmark scripts run end to end (tiny sizes; numbers are not checked here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import QUICK_CODEGEN, require_module
from internimage_jax.export.onnx import INSTALL

REPO = Path(__file__).resolve().parents[1]


def test_dcnv3_op_benchmark_runs(tmp_path):
  out = tmp_path / "op.json"
  subprocess.run([sys.executable, "benchmarks/dcnv3_op.py", "--batch", "1", "--levels", "3",
                  "--repeats", "1", "--json", str(out)], check=True, cwd=REPO,
                 capture_output=True, text=True)
  results = json.loads(out.read_text())["results"]
  assert {(r["mode"], r["impl"]) for r in results} == {("fwd", "xla"), ("fwd_bwd", "xla")}
  for r in results:
    assert r["seconds"] > 0 and r["xla_temp_plus_output_bytes"] > 0
    assert r["size"] == 7 and r["channels"] == 512 and r["group"] == 32  # T level 3


def test_model_benchmark_runs():
  options = json.dumps({"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]})
  proc = subprocess.run([sys.executable, "benchmarks/model.py", "--batch", "2", "--image-size",
                         "32", "--repeats", "1", "--options", options],
                        check=True, cwd=REPO, capture_output=True, text=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["infer_images_per_second"] > 0 and result["train_images_per_second"] > 0
  assert result["first_loss"] > 0


def test_export_benchmark_runs():
  require_module("jax2onnx", f"ONNX export: {INSTALL}")
  options = json.dumps({"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8]})
  proc = subprocess.run([sys.executable, "benchmarks/export.py", "--batch", "2", "--image-size",
                         "32", "--repeats", "1", "--options", options],
                        check=True, cwd=REPO, capture_output=True, text=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["jax_images_per_s"] > 0 and result["onnxruntime_images_per_s"] > 0
  assert result["max_abs_difference_over_max_logit"] < 1e-4
  assert result["onnx_bytes"] > 0 and result["stablehlo_bytes"] > 0


def _gpu_check(tmp_path, *flags: str) -> tuple[dict, str]:
  """``benchmarks/gpu_check.py FLAGS`` on this CPU (quick codegen, from conftest's
  XLA_FLAGS): its JSON report and markdown."""
  subprocess.run([sys.executable, "benchmarks/gpu_check.py", *flags, "--repeats", "1",
                  "--budget", "400", "--out", str(tmp_path)], check=True, cwd=REPO,
                 capture_output=True, text=True)
  return (json.loads((tmp_path / "gpu_check.json").read_text()),
          (tmp_path / "gpu_check.md").read_text())


def _check_kernel_stages(report: dict, markdown: str) -> None:
  """Correctness, operator timings of both implementations, the launch-configuration
  sweep with its tuned entries, and the markdown of each."""
  assert report["correctness"] and all(r["ok"] for r in report["correctness"])
  assert {r["impl"] for r in report["operator"]} == {"pallas", "xla"}
  assert {r["mode"] for r in report["operator"]} == {"fwd", "fwd_bwd"}
  assert {tuple(t["key"]) for t in report["tuned"]} == {("forward", 16, "float32"),
                                                        ("backward", 16, "float32")}
  modes = {r["mode"] for r in report["sweep"]}
  assert modes == {"forward", "backward", "backward without grad_x atomics"}
  assert "correctness" in markdown and "vs xla" in markdown and "TUNED_TRITON" in markdown


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
  """The prepared GPU command, in its tiny CPU mode (Pallas kernels interpreted; no
  device tests, no CUDA originals)."""
  report, markdown = _gpu_check(tmp_path, "--smoke")
  _check_kernel_stages(report, markdown)
  assert {s["implementation"] for s in report["train_t"]} == {"pallas", "xla"}
  assert all("train_images_per_second" in s for s in report["train_t"])
  assert "train_t" in markdown


def test_gpu_check_quick_mode_runs_on_cpu(tmp_path):
  """The fast twin of the test above: ``--quick`` runs the same stages' code but the
  train step (smallest shapes, one launch configuration), in ~30 s."""
  report, markdown = _gpu_check(tmp_path, "--quick")
  _check_kernel_stages(report, markdown)
  assert "train_t" not in report
  assert len({r["config"]["block_q"] for r in report["sweep"]}) == 1


def test_train_step_benchmark_searches_and_runs_the_largest_batch():
  """benchmarks/train_step.py: compile-only steps search for the largest batch that
  fits by XLA's memory analysis (here capped by --max-batch), then the full step of
  train.py runs at it, with the executable the search compiled (no second compile)."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/train_step.py", "--model", "internimage_t", "--image-size",
       "32", "--start-batch", "2", "--max-batch", "8", "--limit-gib", "1", "--steps", "1",
       "--budget", "600", "--options",
       '{"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN, JAX_PLATFORMS="cpu"))
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  *search, run = summary["rows"]
  assert [r["batch_per_device"] for r in search] == [2, 8] and all(r["fits"] for r in search)
  assert summary["largest_by_analysis"] == 8 and summary["smallest_over_by_analysis"] is None
  assert run["batch_per_device"] == 8 and run["step_s"] > 0 and run["first_loss"] > 0
  assert run["compiled_by"] == "search" and not run["autotuned"] and "compile_s" not in run
  assert summary["largest"] == run and run["total_bytes"] <= 2**30


def test_scaling_benchmark_reports_sharded_memory():
  """benchmarks/scaling.py on 4 fake devices: FSDP shards the state four ways."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/scaling.py", "--model", "internimage_t", "--image-size", "32",
       "--per-device-batch", "1", "--devices", "4", "--mesh", "data=1,fsdp=4", "--remat",
       "block", "--init", "--options",
       '{"channels": 16, "depths": [1, 1, 2, 1], "groups": [1, 2, 4, 8]}'],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN))
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["mesh"] == {"data": 1, "fsdp": 4} and report["devices"] == 4
  # Nearly every tensor splits four ways; a few small ones (odd sizes) do not.
  assert report["param_bytes_per_device"] < 0.3 * report["param_bytes_total"]
  assert report["state_bytes_per_device"] < 0.3 * report["state_bytes_total"]
  assert report["total_bytes"] >= report["state_bytes_per_device"] > 0
  # --init compiles the step and the init together, as train.py does.
  assert min(report["step_s"], report["init_s"]) > 0
  assert report["first_step_s"] >= max(report["step_s"], report["init_s"])


# A small backbone and heads: UperNet's 512-channel head would make the compile a minute.
SMALL_SEGMENTOR = {"channels": 8, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8],
                   "decode_head": {"channels": 16}, "auxiliary_head": {"channels": 8}}


# Four programs compiled (~80 s on two busy cores); the segmentation step itself runs in
# the default run through train.py (test_seg_train.py).
@pytest.mark.slow
def test_segmentation_benchmark_compares_with_classification():
  """benchmarks/segmentation.py: train step (UperNet recipe vs classification recipe) and
  inference (segmentor vs its backbone) in one run, a JSON line each and the ratios."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/segmentation.py", "--image-size", "64",
       "--per-device-batch", "1", "--steps", "1", "--options", json.dumps(SMALL_SEGMENTOR)],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN, JAX_PLATFORMS="cpu"))
  *rows, summary = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert summary["rows"] == rows
  assert [(r["measurement"], r["model"], r.get("task"), r.get("part")) for r in rows] == [
      ("train_step", "internimage_t", "classification", None),
      ("train_step", "upernet_internimage_t", "segmentation", None),
      ("inference", "upernet_internimage_t", None, "segmentor"),
      ("inference", "upernet_internimage_t", None, "backbone")]
  assert all(r["images_per_s"] > 0 for r in rows)
  assert [r["num_classes"] for r in rows[:2]] == [1000, 150]
  assert all(r["first_loss"] > 0 for r in rows[:2])
  train, infer = summary["train_images_per_s"], summary["inference_images_per_s"]
  assert summary["train_ratio_seg_over_cls"] == pytest.approx(
      train["segmentation"] / train["classification"])
  assert summary["inference_ratio_seg_over_backbone"] == pytest.approx(
      infer["segmentor"] / infer["backbone"])
  assert summary["batch"] == 1 and summary["machine"]["backend"] == "cpu"
  assert summary["command"].startswith("python benchmarks/segmentation.py --image-size 64")


def test_scaling_benchmark_shards_a_segmentor():
  """benchmarks/scaling.py with a UperNet recipe (150 classes, no EMA) on 4 fake
  devices: FSDP shards its state four ways too."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/scaling.py", "--model", "upernet_internimage_t",
       "--image-size", "64", "--per-device-batch", "1", "--devices", "4", "--mesh",
       "data=1,fsdp=4", "--remat", "block", "--options", json.dumps(SMALL_SEGMENTOR)],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN))
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["task"] == "segmentation" and not report["ema"]
  assert report["mesh"] == {"data": 1, "fsdp": 4} and report["devices"] == 4
  assert report["param_bytes_per_device"] < 0.3 * report["param_bytes_total"]
  assert report["state_bytes_per_device"] < 0.3 * report["state_bytes_total"]
  assert report["total_bytes"] >= report["state_bytes_per_device"] > 0
  assert report["compile_s"] > 0


def test_gpu_check_keeps_the_last_summary_of_a_timed_out_stage():
  """A stage killed by its timeout still reports the summary it printed last (the H
  step prints one after each run), marked as timed out; without one, an error row."""
  sys.path.insert(0, str(REPO))
  from benchmarks.gpu_check import run_json

  script = ('import json, time; print(json.dumps({"rows": [1]}), flush=True); '
            'print(json.dumps({"batch_per_device": 2}), flush=True); time.sleep(60)')
  partial = run_json([sys.executable, "-c", script], timeout=3, partial_key="rows")
  assert partial == {"rows": [1], "timed_out": "after 3 s"}
  assert run_json([sys.executable, "-c", script], timeout=3) == {"error": "timed out after 3 s"}


def test_access_pattern_counts_fewer_lines_for_pixel_tiles():
  """benchmarks/access_pattern.py walks the kernels' own lane mapping: a 4-row tile
  gathers the same corner rows as a run of one row, from fewer cache lines."""
  sys.path.insert(0, str(REPO))
  from benchmarks.access_pattern import program_footprint
  from pallas_kernels.dcnv3.config import TritonConfig
  from pallas_kernels.dcnv3.shapes import stage_shapes

  shape = stage_shapes("internimage_t", 1)[1]  # 28 x 28, 8 groups: 8 pixels per program
  run = program_footprint(shape, TritonConfig(64, 4))
  tile = program_footprint(shape, TritonConfig(64, 4, tile_rows=4))  # 4 x 2 pixels
  assert run["programs"] == tile["programs"] == 28 * 28 * 8 // 64
  assert run["corner_rows"] == pytest.approx(tile["corner_rows"])
  assert tile["distinct_lines"] < run["distinct_lines"]


# A small backbone and Mask R-CNN parts (the neck, the heads, and fewer proposals and
# RoI samples than mmdet's defaults).
SMALL_DETECTOR = {"channels": 16, "depths": [1, 1, 1, 1], "groups": [1, 2, 4, 8],
                  "neck": {"out_channels": 32},
                  "roi_head": {"bbox_head": {"fc_out_channels": 64},
                               "mask_head": {"num_convs": 1, "conv_out_channels": 16}},
                  "train_cfg": {"rcnn": {"sampler": {"num": 64}},
                                "rpn_proposal": {"nms_pre": 200, "max_per_img": 100}},
                  "test_cfg": {"rpn": {"max_per_img": 100}}}


# Four programs compiled (~75-100 s on two busy cores, most of it the detector's); the
# detection step itself runs in the default run through train.py.
@pytest.mark.slow
def test_detection_benchmark_compares_with_classification():
  """benchmarks/detection.py: train step (Mask R-CNN COCO recipe vs classification
  recipe, synthetic boxes and masks) and inference (detector vs its backbone) in one
  run, a JSON line each and the ratios."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/detection.py", "--image-size", "64",
       "--per-device-batch", "1", "--steps", "1", "--options", json.dumps(SMALL_DETECTOR)],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN, JAX_PLATFORMS="cpu"))
  *rows, summary = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  assert summary["rows"] == rows
  assert [(r["measurement"], r["model"], r.get("task"), r.get("part")) for r in rows] == [
      ("train_step", "internimage_t", "classification", None),
      ("train_step", "mask_rcnn_internimage_t", "detection", None),
      ("inference", "mask_rcnn_internimage_t", None, "detector"),
      ("inference", "mask_rcnn_internimage_t", None, "backbone")]
  assert all(r["images_per_s"] > 0 for r in rows)
  assert [r["num_classes"] for r in rows[:2]] == [1000, 80]
  assert all(r["first_loss"] > 0 for r in rows[:2])
  assert rows[2]["detections_per_image"] >= 0
  train, infer = summary["train_images_per_s"], summary["inference_images_per_s"]
  assert summary["train_ratio_det_over_cls"] == pytest.approx(
      train["detection"] / train["classification"])
  assert summary["inference_ratio_det_over_backbone"] == pytest.approx(
      infer["detector"] / infer["backbone"])
  assert min(summary["train_ratio_det_over_cls"], summary["train_compile_s"],
             summary["inference_ratio_det_over_backbone"]) > 0
  assert summary["batch"] == 1 and summary["image_size"] == 64
  assert summary["machine"]["backend"] == "cpu"
  assert summary["command"].startswith("python benchmarks/detection.py --image-size 64")


def test_synthetic_detection_batch_is_valid():
  """benchmarks.common.synthetic_batch for the COCO recipe: a few boxes well inside
  each image, their masks the filled boxes (packed), the other slots zero."""
  import numpy as np

  sys.path.insert(0, str(REPO))
  from benchmarks.common import NUM_CLASSES, synthetic_batch, train_config
  from internimage_jax.training.trainer import TrainProgram

  cfg = train_config("mask_rcnn_internimage_t", 64, 2, "data=-1,fsdp=1", "none", "float32",
                     options=SMALL_DETECTOR)
  assert cfg.task == "detection" and cfg.data.image_size == 64 and not cfg.train.ema_decay
  assert cfg.model.neck.out_channels == 32 and cfg.model.overrides.channels == 16
  program = TrainProgram(cfg, num_classes=NUM_CLASSES[cfg.task], steps_per_epoch=1000)
  batch = {k: np.asarray(v) for k, v in synthetic_batch(program, 2).items()}
  slots = cfg.data.max_instances
  assert batch["masks"].shape == (2, slots, 64, 8) and batch["masks"].dtype == np.uint8
  n = min(slots, 8)
  assert (batch["num"] == n).all()
  boxes, real = batch["boxes"], batch["boxes"][:, :n]
  assert (boxes[:, n:] == 0).all() and (batch["labels"][:, n:] == 0).all()
  assert ((batch["labels"] >= 0) & (batch["labels"] < 80)).all()
  sides = real[..., 2:] - real[..., :2]
  assert (sides >= 64 / 8 - 1e-3).all() and (sides <= 64 / 2 + 1e-3).all()
  assert (real[..., :2] >= 64 / 16 - 1e-3).all() and (real[..., 2:] <= 64 - 64 / 16 + 1e-3).all()
  masks = np.unpackbits(batch["masks"], axis=-1)
  assert not masks[:, n:].any()
  # Each mask is its box's pixels (those with centres inside).
  centre = np.arange(64) + 0.5
  for box, mask in zip(real.reshape(-1, 4), masks[:, :n].reshape(-1, 64, 64)):
    rows = (centre >= box[1]) & (centre < box[3])
    cols = (centre >= box[0]) & (centre < box[2])
    np.testing.assert_array_equal(mask, rows[:, None] & cols[None, :])
  with pytest.raises(SystemExit, match="neck"):
    train_config("internimage_t", 64, 2, "data=-1,fsdp=1", "none", "float32",
                 options={"neck": {"out_channels": 32}})


def test_scaling_benchmark_shards_a_detector():
  """benchmarks/scaling.py with the Mask R-CNN COCO recipe (80 classes, no EMA) on 2
  fake devices: FSDP shards its state two ways."""
  import os

  proc = subprocess.run(
      [sys.executable, "benchmarks/scaling.py", "--model", "mask_rcnn_internimage_t",
       "--image-size", "64", "--per-device-batch", "1", "--devices", "2", "--mesh",
       "data=1,fsdp=2", "--options", json.dumps(SMALL_DETECTOR)],
      cwd=REPO, capture_output=True, text=True, check=True,
      env=dict(os.environ, XLA_FLAGS=QUICK_CODEGEN))
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["task"] == "detection" and not report["ema"]
  assert report["mesh"] == {"data": 1, "fsdp": 2} and report["devices"] == 2
  assert report["param_bytes_per_device"] < 0.55 * report["param_bytes_total"]
  assert report["state_bytes_per_device"] < 0.55 * report["state_bytes_total"]
  assert report["total_bytes"] >= report["state_bytes_per_device"] > 0
  assert report["compile_s"] > 0
