"""Official weights <-> NNX: files, command line, round trip and error reporting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (MINI_H, MINI_T, TOL_NET_F32, assert_rel_close, load_golden, params_of,
                     require_golden)
from internimage_jax import convert, models

REPO = Path(__file__).resolve().parents[1]
MINI_S = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))  # S options: post-norm + layer scale


def _mini_t(num_classes: int = 10) -> models.InternImage:
  return models.create("internimage_t", num_classes=num_classes, **MINI_T)


def _check_mini_t_logits(model: models.InternImage) -> None:
  g = load_golden("model_mini_t")
  model.eval()
  logits = model(jnp.asarray(g["input_nchw"].transpose(0, 2, 3, 1), jnp.float32))
  assert_rel_close(logits, g["logits"], TOL_NET_F32, "logits")


def test_load_checkpoint_reads_the_official_pth():
  model = _mini_t()
  report = convert.load_checkpoint(model, require_golden() / "model_mini_t.pth")
  assert report.missing == report.unexpected == report.mismatched == []
  _check_mini_t_logits(model)


def test_command_line_converts_pth_to_orbax(tmp_path):
  out = tmp_path / "mini_t"
  result = subprocess.run(
      [sys.executable, "-m", "internimage_jax.convert", "--model", "internimage_t",
       "--checkpoint", str(require_golden() / "model_mini_t.pth"), "--out", str(out),
       "--options", json.dumps(MINI_T)],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  assert "10 classes" in result.stdout  # read from the checkpoint's head
  assert json.loads((out / "model.json").read_text())["num_classes"] == 10
  model = _mini_t()
  convert.load_checkpoint(model, out)
  _check_mini_t_logits(model)

  # And back to an official-layout safetensors file.
  back = tmp_path / "mini_t.safetensors"
  result = subprocess.run(
      [sys.executable, "-m", "internimage_jax.convert", "--model", "internimage_t",
       "--checkpoint", str(out), "--out", str(back)],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr
  from safetensors.numpy import load_file
  exported = load_file(str(back))
  official = params_of(load_golden("model_mini_t"))
  assert set(exported) == set(official)
  for key, value in official.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_command_line_reports_errors_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "internimage_jax.convert", "--model", "internimage_t",
       "--checkpoint", str(require_golden() / "model_mini_t.pth"), "--out", str(tmp_path / "x")],
      capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 1
  assert "missing" in result.stderr and "shape mismatch" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case", ["model_mini_t", "model_mini_h"])
def test_round_trip_is_exact(case):
  official = params_of(load_golden(case))
  options = MINI_T if case == "model_mini_t" else MINI_H
  model = models.create("internimage_t", num_classes=10, **options)
  convert.load_state_dict(model, official)
  exported = convert.to_state_dict(model)
  assert set(exported) == set(official)
  for key, value in official.items():
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_strict_load_reports_every_problem_at_once():
  official = params_of(load_golden("model_mini_t"))
  broken = dict(official)
  del broken["levels.0.blocks.0.dcn.offset.weight"]
  del broken["head.bias"]
  broken["levels.9.extra.weight"] = np.zeros(3, np.float32)
  broken["levels.0.norm.0.weight"] = np.zeros(5, np.float32)
  model = _mini_t()
  before = convert.to_state_dict(model)
  with pytest.raises(convert.CheckpointMismatchError) as info:
    convert.load_state_dict(model, broken)
  message = str(info.value)
  for text in ("missing (2)", "levels.0.blocks.0.dcn.offset.weight", "head.bias",
               "unexpected (1)", "levels.9.extra.weight", "shape mismatch (1)",
               "levels.0.norm.0.weight"):
    assert text in message, (text, message)
  # A failed strict load changes nothing.
  after = convert.to_state_dict(model)
  for key in before:
    np.testing.assert_array_equal(before[key], after[key])
  # Non-strict loads what fits and reports the rest.
  report = convert.load_state_dict(model, broken, strict=False)
  assert report.missing == ["head.bias", "levels.0.blocks.0.dcn.offset.weight"]
  assert report.unexpected == ["levels.9.extra.weight"]
  assert len(report.mismatched) == 1
  np.testing.assert_array_equal(convert.to_state_dict(model)["head.weight"], official["head.weight"])


def test_head_with_another_class_count_is_a_shape_mismatch():
  official = params_of(load_golden("model_mini_t"))
  model = _mini_t(num_classes=4)
  with pytest.raises(convert.CheckpointMismatchError, match="head.weight"):
    convert.load_state_dict(model, official)
  report = convert.load_state_dict(model, official, strict=False)  # fine-tuning: new head
  assert sorted(k.split(":")[0] for k in report.mismatched) == ["head.bias", "head.weight"]


def test_hugging_face_names_and_wrappers(tmp_path):
  torch = pytest.importorskip("torch")
  source = models.create("internimage_s", num_classes=6, rngs=nnx.Rngs(5), **MINI_S)
  official = convert.to_state_dict(source)
  assert "levels.0.blocks.0.gamma1" in official
  hf = {"model." + k.replace(".gamma1", ".layer_scale1").replace(".gamma2", ".layer_scale2"): v
        for k, v in official.items()}
  target = models.create("internimage_s", num_classes=6, rngs=nnx.Rngs(6), **MINI_S)
  convert.load_state_dict(target, hf)
  _assert_same(convert.to_state_dict(target), official)

  tensors = {k: torch.from_numpy(np.array(v)) for k, v in official.items()}
  noise = {k: t + 1 if t.is_floating_point() else t for k, t in tensors.items()}
  for wrapper, use_ema, want in (
      ({"state_dict": tensors}, False, official),
      ({"module": {"module." + k: t for k, t in tensors.items()}}, False, official),
      ({"model": noise, "model_ema": tensors}, True, official),
  ):
    path = tmp_path / "weights.pth"
    torch.save(wrapper, path)
    target = models.create("internimage_s", num_classes=6, rngs=nnx.Rngs(7), **MINI_S)
    convert.load_checkpoint(target, path, use_ema=use_ema)
    _assert_same(convert.to_state_dict(target), want)
  with pytest.raises(convert.CheckpointMismatchError, match="model_ema"):
    torch.save({"model": tensors}, tmp_path / "no_ema.pth")
    convert.load_checkpoint(target, tmp_path / "no_ema.pth", use_ema=True)


def test_safetensors_and_npz_need_no_torch(tmp_path):
  source = _mini_t()
  convert.load_state_dict(source, params_of(load_golden("model_mini_t")))
  path = convert.save_safetensors(source, tmp_path / "w.safetensors")
  np.savez(tmp_path / "w.npz", **convert.to_state_dict(source))
  for file in (path, tmp_path / "w.npz"):
    target = _mini_t()
    convert.load_checkpoint(target, file)
    _check_mini_t_logits(target)
  code = ("import sys; sys.modules['torch'] = None\n"
          "from internimage_jax import convert, models\n"
          f"m = models.create('internimage_t', num_classes=10, **{MINI_T!r})\n"
          f"convert.load_checkpoint(m, {str(path)!r})\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_single_dcnv3_module_with_relative_keys():
  g = load_golden("module_default")
  module = models.DCNv3(channels=32, group=4, rngs=nnx.Rngs(0))
  convert.load_state_dict(module, params_of(g))
  exported = convert.to_state_dict(module)
  assert set(exported) == set(params_of(g))
  assert "dw_conv.0.weight" in exported and "dw_conv.1.1.weight" in exported


def test_unreadable_or_missing_checkpoints_are_named(tmp_path):
  model = _mini_t()
  with pytest.raises(FileNotFoundError, match="not found"):
    convert.load_checkpoint(model, tmp_path / "nope.pth")
  (tmp_path / "w.txt").write_text("x")
  with pytest.raises(ValueError, match="unsupported checkpoint format"):
    convert.load_checkpoint(model, tmp_path / "w.txt")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="not an orbax checkpoint"):
    convert.load_checkpoint(model, tmp_path / "empty")
  other = models.create("internimage_t", num_classes=10, channels=8, depths=(1, 1, 1, 1),
                        groups=(1, 2, 4, 8))
  convert.save_orbax(other, tmp_path / "other")
  with pytest.raises(convert.CheckpointMismatchError, match="does not match"):
    convert.load_checkpoint(model, tmp_path / "other")


def _assert_same(got: dict, want: dict) -> None:
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_damaged_or_foreign_files_are_one_line_errors(tmp_path):
  import pickle

  import torch
  from safetensors.numpy import save_file

  torch.save({"a": torch.ones(3)}, tmp_path / "ok.pth")
  whole = (tmp_path / "ok.pth").read_bytes()
  (tmp_path / "truncated.pth").write_bytes(whole[:len(whole) // 2])
  (tmp_path / "garbage.pth").write_bytes(b"hello world" * 10)
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled object, not weights
  (tmp_path / "plain.bin").write_bytes(pickle.dumps({"a": np.ones(3)}))
  save_file({"a": np.ones(3, np.float32)}, str(tmp_path / "ok.safetensors"))
  (tmp_path / "truncated.safetensors").write_bytes((tmp_path / "ok.safetensors").read_bytes()[:-5])
  (tmp_path / "garbage.npz").write_bytes(b"\x00" * 20)
  expected = {
      "truncated.pth": "the file is truncated or damaged",
      "garbage.pth": "not a PyTorch checkpoint",
      "module.pth": "it holds objects other than tensors",
      "plain.bin": "it holds objects other than tensors",
      "truncated.safetensors": "as safetensors: Error while deserializing header",
      "garbage.npz": "as an .npz archive of arrays",
  }
  for name, why in expected.items():
    with pytest.raises(convert.CheckpointReadError) as info:
      convert.read_state_dict(tmp_path / name)
    message = str(info.value)
    assert name in message and why in message and "\n" not in message, message
    assert "weights_only=False" not in message and "weights_only` set to `False" not in message

  model = _mini_t()
  convert.save_orbax(model, tmp_path / "orbax")
  data = max((tmp_path / "orbax" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:100])
  with pytest.raises(convert.CheckpointReadError, match="its data is damaged"):
    convert.load_checkpoint(model, tmp_path / "orbax")
  (tmp_path / "orbax" / "state" / "_METADATA").unlink()
  with pytest.raises(convert.CheckpointReadError, match="_METADATA file is missing"):
    convert.load_checkpoint(model, tmp_path / "orbax")


def test_command_line_refuses_existing_outputs_unless_overwrite(tmp_path):
  pth = str(require_golden() / "model_mini_t.pth")
  command = [sys.executable, "-m", "internimage_jax.convert", "--model", "internimage_t",
             "--checkpoint", pth, "--options", json.dumps(MINI_T)]
  for out in (tmp_path / "mini.safetensors", tmp_path / "orbax"):
    first = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True,
                           cwd=REPO, check=False)
    assert first.returncode == 0, first.stderr
    written = sorted(p.stat().st_mtime_ns for p in [out, *out.rglob("*")])
    again = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True,
                           cwd=REPO, check=False)
    assert again.returncode == 1
    assert again.stderr == f"error: {out} exists; choose another output or pass --overwrite\n"
    assert sorted(p.stat().st_mtime_ns for p in [out, *out.rglob("*")]) == written
    forced = subprocess.run([*command, "--out", str(out), "--overwrite"], capture_output=True,
                            text=True, cwd=REPO, check=False)
    assert forced.returncode == 0, forced.stderr
  model = _mini_t()
  convert.load_checkpoint(model, tmp_path / "orbax")
  _check_mini_t_logits(model)
  assert not list(tmp_path.glob("orbax.tmp-*"))  # the staging directory is gone


@pytest.mark.parametrize("name", [
    "internimage_t", "internimage_h", "internimage_g",
    *(pytest.param(n, marks=pytest.mark.slow)
      for n in ("internimage_s", "internimage_b", "internimage_l", "internimage_xl"))])
def test_official_layout_of_every_variant(name):
  """Every variant's stacked parameters under the official names, one per block, with
  the spec's parameter count (shapes only: nothing is allocated)."""
  from helpers import PARAM_COUNTS
  from internimage_jax.models.variants import VARIANTS

  model = nnx.eval_shape(lambda: models.create(name))
  shapes = {}
  for path, names in convert.official_names(model).items():
    var = nnx.state(model, nnx.Param)
    for p in path:
      var = var[p]
    shape = var.get_value().shape
    stacked = "blocks" in path or "post_norms" in path
    assert len(names) == (shape[0] if stacked else 1), path
    for n in names:
      shapes[n] = shape[1:] if stacked else shape
  assert sum(int(np.prod(s)) for s in shapes.values()) == PARAM_COUNTS[name]
  options = VARIANTS[name]
  for level, depth in enumerate(options["depths"]):
    for block in range(depth):
      assert f"levels.{level}.blocks.{block}.dcn.input_proj.weight" in shapes
  for k, _ in enumerate(options.get("level2_post_norm_block_ids", ())):
    assert f"levels.2.post_norms.{k}.0.weight" in shapes
  assert len(shapes) == len(set(shapes))


def test_stacked_round_trip_and_partial_loads(tmp_path):
  """A level's stacked blocks: exported one per block and loaded back exactly into a
  model of another seed; a non-strict load of some blocks keeps the others."""
  source = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(1), **MINI_H)
  exported = convert.to_state_dict(source)
  target = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(2), **MINI_H)
  convert.load_state_dict(target, exported)
  weights = lambda m: jax.tree.leaves(nnx.state(m, convert.WEIGHTS))
  for a, b in zip(weights(source), weights(target)):
    np.testing.assert_array_equal(a, b)
  fresh = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(2), **MINI_H)
  before = np.asarray(fresh.levels[2].blocks.mlp.fc1.kernel[...])
  partial = {k: v for k, v in exported.items() if k.startswith("levels.2.blocks.1.")}
  report = convert.load_state_dict(fresh, partial, strict=False)
  after = np.asarray(fresh.levels[2].blocks.mlp.fc1.kernel[...])
  np.testing.assert_array_equal(after[1], exported["levels.2.blocks.1.mlp.fc1.weight"].T)
  np.testing.assert_array_equal(np.delete(after, 1, 0), np.delete(before, 1, 0))
  assert "levels.2.blocks.0.mlp.fc1.weight" in report.missing


def test_orbax_checkpoints_of_the_per_block_layout_say_what_to_do(tmp_path):
  """Converted directories written before levels held stacked blocks (one entry per
  block) are refused with what to do, not as damaged or foreign."""
  import orbax.checkpoint as ocp

  old = {"levels": {"0": {"blocks": {"0": {"norm1": {"scale": np.ones(16, np.float32)}}}}}}
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp_path / "old" / convert.STATE_DIR).absolute(), old)
  with pytest.raises(convert.CheckpointMismatchError, match="convert the official weights again"):
    convert.load_checkpoint(_mini_t(), tmp_path / "old")
