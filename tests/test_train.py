"""The main job: quickstart accuracy, kill-and-resume, sharded runs, bad input."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import (COLLECTIVE_PATIENCE, QUICK_CODEGEN, QUICKSTART, REPO, metrics_rows,
                     run_quickstart, train_env, train_losses)


def test_quickstart_learns_the_digits(tmp_path):
  run_quickstart(tmp_path, "--config.train.epochs=3")
  evals = [m for m in metrics_rows(tmp_path) if "eval/top1" in m]
  assert evals and evals[-1]["eval/top1"] >= 0.95, evals
  assert 0.0 <= evals[-1]["eval/top5"] <= 1.0
  assert 0.0 <= evals[-1]["eval_ema/top1"] <= 1.0  # the EMA weights are evaluated beside
  trains = [m for m in metrics_rows(tmp_path) if "train/loss" in m]
  assert all(m["train/lr"] > 0 and m["train/images_per_second"] > 0 for m in trains)
  assert (tmp_path / "checkpoints" / str(evals[-1]["step"])).is_dir()
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_eight_fake_devices_match_one(tmp_path):
  overrides = ["--config.train.epochs=0.2", "--config.log_every_steps=1",
               "--config.eval_every_steps=1000"]
  run_quickstart(tmp_path / "one", *overrides)
  run_quickstart(tmp_path / "eight", *overrides, "--config.mesh.data=2", "--config.mesh.fsdp=4",
         devices=8)
  one, eight = train_losses(tmp_path / "one"), train_losses(tmp_path / "eight")
  assert sorted(one) == sorted(eight) and len(one) >= 3
  for step in one:
    assert eight[step] == pytest.approx(one[step], rel=1e-5), step


def test_bad_input_is_reported_clearly(tmp_path):
  typo = run_quickstart(tmp_path / "a", "--config.train.globl_batch=8", check=False)
  assert typo.returncode != 0 and "globl_batch" in typo.stderr
  split = run_quickstart(tmp_path / "b", "--config.train.global_batch=63", "--config.mesh.data=2",
                 devices=2, check=False)
  assert split.returncode != 0 and "not divisible" in split.stderr
  assert "Traceback" not in split.stderr
  # Level 0 has one block: its stacked axis cannot split two ways (FSDP would leave an
  # odd size whole; any other axis rule must divide).
  odd = run_quickstart(tmp_path / "d", "--config.mesh.model=2", "--config.axis_rules.layers=model",
                       devices=2, check=False)
  assert odd.returncode != 0 and "Traceback" not in odd.stderr
  assert re.search(r"levels\.0\.blocks\.\S+ of shape \(1, .*: dimension 0 \(layers, size 1\) "
                   r"cannot split 2 ways over mesh axis 'model'", odd.stderr), odd.stderr[-2000:]
  run_quickstart(tmp_path / "c", "--config.train.epochs=0.1", "--config.checkpoint.every_steps=1")
  other = run_quickstart(tmp_path / "c", "--config.model.overrides.channels=8", check=False)
  assert other.returncode != 0 and "does not fit this config" in other.stderr
  assert "Traceback" not in other.stderr


def test_init_from_official_weights_and_eval_mode(tmp_path):
  """Evaluation of converted weights, and fine-tuning with a new head."""
  import jax
  import numpy as np
  from flax import nnx

  from helpers import load_golden, params_of, require_golden
  from internimage_jax import convert, models
  from internimage_jax.training.trainer import Trainer

  pth = require_golden() / "model_mini_t.pth"  # the quickstart's architecture, 10 classes
  result = run_quickstart(tmp_path / "eval", "--config.mode=eval", f"--config.init_from={pth}")
  assert "eval: eval/top1" in result.stdout
  assert not (tmp_path / "eval" / "checkpoints").exists() or not list(
      (tmp_path / "eval" / "checkpoints").iterdir())

  # A 1000-class checkpoint: everything but the head loads, the head stays fresh.
  source = models.create("internimage_t", num_classes=1000, rngs=nnx.Rngs(3),
                         channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
  convert.load_state_dict(source, {k: v for k, v in params_of(load_golden("model_mini_t")).items()
                                   if not k.startswith("head.")}, strict=False)
  path = convert.save_safetensors(source, tmp_path / "in1k.safetensors")
  import importlib.util
  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  cfg = quickstart.get_config()
  cfg.init_from = str(path)
  trainer = Trainer(cfg, tmp_path / "finetune")
  state, rng_state = trainer.initial_state()
  trainer.close()
  model = trainer.program.merge(jax.device_get(state), jax.device_get(rng_state))
  got, want = convert.to_state_dict(model), convert.to_state_dict(source)
  for key in want:
    if key.startswith("head."):
      assert got[key].shape[0] == 10
    else:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_fsdp_really_shards_parameters_and_optimizer_state():
  code = """
import importlib.util, jax, numpy as np
spec = importlib.util.spec_from_file_location("q", "configs/quickstart.py")
q = importlib.util.module_from_spec(spec); spec.loader.exec_module(q)
from internimage_jax.training.trainer import Trainer
import tempfile
cfg = q.get_config("fsdp")
t = Trainer(cfg, tempfile.mkdtemp())
state, _ = t.initial_state()
t.close()
from flax import nnx
from internimage_jax.models.partitioning import is_variable, stacked_dims
def fraction(tree):
    # Matrices and kernels (one block's rank, for the stacked block parameters).
    leaves = [v.get_value() for v in jax.tree.leaves(tree, is_leaf=is_variable)
              if is_variable(v) and v.get_value().ndim - stacked_dims(v) >= 2]
    sharded = [a for a in leaves if a.addressable_shards[0].data.size * 8 == a.size]
    return len(sharded) / len(leaves)
print(fraction(state["params"]), fraction(state["opt_state"]))
"""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {QUICK_CODEGEN}")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, check=True)
  params, opt = map(float, proc.stdout.split()[-2:])
  # Every matrix with a dimension divisible by 8 is split eight ways (most of them).
  assert params > 0.9 and opt > 0.9, (params, opt)


def _two_processes(workdir: Path, overrides: list[str], port: int) -> list[subprocess.Popen]:
  return [subprocess.Popen(
      [sys.executable, *QUICKSTART, "--workdir", str(workdir), *overrides,
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=train_env(2, COLLECTIVE_PATIENCE), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]


def _free_port() -> int:
  import socket

  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # CI time; two processes restoring onto another mesh: test_multiprocess
def test_two_processes_preempted_together_then_match_one(tmp_path):
  """jax.distributed on localhost: 2 processes x 2 devices = 1 process x 4 devices, with
  a SIGTERM to process 0 only: both save the same step, exit 143, and resume."""
  overrides = ["--config.train.epochs=0.15", "--config.log_every_steps=1",
               "--config.eval_every_steps=1000"]
  two = tmp_path / "two"
  procs = _two_processes(two, overrides, _free_port())
  deadline = time.time() + 300
  while not (two / "lock").exists():  # process 0 has its handlers (they come first)
    assert time.time() < deadline and all(p.poll() is None for p in procs), "no lock"
    time.sleep(0.02)
  procs[0].send_signal(signal.SIGTERM)  # while compiling: honoured at the first step
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 128 + signal.SIGTERM, err[-3000:]
  stops = [re.search(r"stopped by (.+?) at step (\d+)", err) for _, err in outputs]
  assert stops[0] and stops[1], [err[-2000:] for _, err in outputs]
  assert [m.group(1) for m in stops] == ["SIGTERM", "a signal to another process"]
  step = int(stops[0].group(2))
  assert int(stops[1].group(2)) == step and (two / "checkpoints" / str(step)).is_dir()

  procs = _two_processes(two, overrides, _free_port())
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert f"resumed from step {step}" in outputs[0][0]
  assert "done:" in outputs[0][0] and "done:" not in outputs[1][0]  # process 0 reports
  run_quickstart(tmp_path / "one", *overrides, devices=4)
  one, two_losses = train_losses(tmp_path / "one"), train_losses(two)
  assert sorted(one) == sorted(two_losses) and len(one) >= 3
  for s in one:
    assert two_losses[s] == pytest.approx(one[s], rel=1e-5), s


def _image_folder(root, classes=3, per_class=8):
  rng = np.random.default_rng(0)
  for split, n in (("train", per_class), ("val", 3)):
    for c in range(classes):
      folder = root / split / f"class_{c}"
      folder.mkdir(parents=True)
      for i in range(n):  # class c: a bright square in quadrant c, on noise
        pixels = rng.integers(0, 60, (40 + i, 48, 3), dtype=np.uint8)
        top, left = divmod(c, 2)
        pixels[top * 20:top * 20 + 20, left * 24:left * 24 + 24] += 150
        Image.fromarray(pixels).save(folder / f"{i}.png")
  (root / "train" / "class_1" / "corrupt.jpg").write_bytes(b"\xff\xd8 truncated")
  return root


IMAGENET_STYLE = [
    "--config.data.source=folder", "--config.data.train_split=train",
    "--config.data.eval_split=val", "--config.data.image_size=32", "--config.data.threads=2",
    "--config.aug.random_resized_crop=True", "--config.aug.hflip=0.5",
    "--config.aug.randaugment=rand-m9-mstd0.5-inc1", "--config.aug.reprob=0.25",
    "--config.aug.mixup=0.8", "--config.aug.cutmix=1.0", "--config.train.global_batch=8",
    "--config.train.epochs=2", "--config.log_every_steps=1", "--config.eval_every_steps=3",
    "--config.checkpoint.every_steps=3"]


def test_image_folder_run_with_the_full_recipe(tmp_path):
  """Image folder, all augmentations, bf16 compute, gradient accumulation, an unreadable
  image skipped and counted; then an eval-only run of the result."""
  root = _image_folder(tmp_path / "images")
  result = run_quickstart(tmp_path / "run", *IMAGENET_STYLE, f"--config.data.dir={root}",
                  "--config.train.compute_dtype=bfloat16", "--config.train.accum_steps=2")
  # 6 batches of 8 (48 images) from epochs of 25 files: the corrupt one is met twice.
  assert "skipped 2 unreadable training images" in result.stdout, result.stdout
  trains = [m for m in metrics_rows(tmp_path / "run") if "train/loss" in m]
  assert len(trains) == 2 * (25 // 8)
  assert all(np.isfinite(m["train/loss"]) for m in trains)
  assert trains[-1]["train/skipped_images"] >= 1
  evals = [m for m in metrics_rows(tmp_path / "run") if "eval/top1" in m]
  assert evals and all(0 <= m["eval/top1"] <= 1 for m in evals)
  again = run_quickstart(tmp_path / "run", *IMAGENET_STYLE, f"--config.data.dir={root}",
                 "--config.train.compute_dtype=bfloat16", "--config.train.accum_steps=2",
                 "--config.mode=eval")
  assert "resumed from step 6" in again.stdout and "eval: eval/top1" in again.stdout


def test_data_errors_are_reported_clearly(tmp_path):
  missing = run_quickstart(tmp_path / "a", *IMAGENET_STYLE, f"--config.data.dir={tmp_path / 'nowhere'}",
                   check=False)
  assert missing.returncode != 0 and "does not exist" in missing.stderr
  (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
  (tmp_path / "empty" / "val" / "cat").mkdir(parents=True)
  empty = run_quickstart(tmp_path / "b", *IMAGENET_STYLE, f"--config.data.dir={tmp_path / 'empty'}",
                 check=False)
  assert empty.returncode != 0 and "holds no images" in empty.stderr
  tfds = run_quickstart(tmp_path / "c", "--config.data.source=tfds", "--config.data.name=no_such_set",
                f"--config.data.dir={tmp_path}", check=False)
  assert tfds.returncode != 0 and "'no_such_set'" in tfds.stderr
  for proc in (missing, empty, tfds):
    assert "Traceback" not in proc.stderr


def test_gradient_accumulation_averages_micro_batches(tmp_path):
  """accum_steps=2 on a batch of 16 = the mean of two batches of 8 (every other example):
  the loss, the gradients (AdamW's first moment after one step is 0.1 x the gradient)
  and the BatchNorm statistics, which the micro-batches update one after the other."""
  import jax
  import numpy as np
  import optax

  from internimage_jax.training.trainer import TrainProgram

  spec = importlib.util.spec_from_file_location("q", REPO / "configs" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)

  def program(batch, accum):
    cfg = quickstart.get_config()
    cfg.model.overrides.drop_path_rate = 0.0
    cfg.train.update(global_batch=batch, accum_steps=accum, label_smoothing=0.0,
                     clip_grad=1e9)  # no clipping: the moments are the gradients
    return TrainProgram(cfg, num_classes=10, steps_per_epoch=10)

  def first_moment(state):
    return optax.tree_utils.tree_get(state["opt_state"], "mu")

  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  whole = program(16, 2)
  state, rngs = whole.init()
  before = jax.device_get(state["batch_stats"])  # the step donates the state
  after, metrics = jax.device_get(whole.train_step(
      state, rngs, {"image": images, "label": labels}))
  half = program(8, 1)
  losses, halves = [], []
  for start in (0, 1):
    state, rngs = half.init()
    new, m = jax.device_get(half.train_step(
        state, rngs, {"image": images[start::2], "label": labels[start::2]}))
    losses.append(float(m["loss"]))
    halves.append(new)
  assert float(metrics["loss"]) == pytest.approx(np.mean(losses), rel=1e-5)

  mu = jax.tree.leaves(first_moment(after))
  mu_halves = [jax.tree.leaves(first_moment(h)) for h in halves]
  scale = max(float(np.max(np.abs(m))) for m in mu)
  assert len(mu) > 20 and scale > 0
  for got, a, b in zip(mu, *mu_halves):
    np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-4, atol=1e-5 * scale)

  # BatchNorm (momentum 0.1, PyTorch's rule): from s0, the micro-batches give
  # s2 = 0.9 s1 + 0.1 b1, where s1 = 0.9 s0 + 0.1 b0 is the first half's result and
  # 0.1 b1 = h1 - 0.9 s0 the second's; the batch counter moves by two.
  stats = jax.tree_util.tree_leaves_with_path(after["batch_stats"])
  assert stats, "the quickstart model has BatchNorm statistics"
  for (path, got), s0, h0, h1 in zip(stats, jax.tree.leaves(before),
                                     *(jax.tree.leaves(h["batch_stats"]) for h in halves)):
    name = jax.tree_util.keystr(path)
    if "num_batches_tracked" in name:
      assert got == s0 + 2 and h0 == s0 + 1, name
    else:
      assert not np.allclose(h0, s0), name  # the step really updates the statistics
      np.testing.assert_allclose(got, 0.9 * h0 + (h1 - 0.9 * s0), rtol=1e-5, atol=1e-6,
                                 err_msg=name)


def test_the_train_step_compiled_ahead_is_the_one_that_runs():
  """The trainer compiles the step in the background while the init compiles: the
  first steps (on the init's state, then on a step's) run that executable, with no
  compile of their own."""
  import jax

  from internimage_jax.training import sharding
  from internimage_jax.training.trainer import TrainProgram

  spec = importlib.util.spec_from_file_location("q", REPO / "configs" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  program = TrainProgram(quickstart.get_config(), num_classes=10, steps_per_epoch=10)
  ahead = program.train_step.compile_ahead(*program.abstract_inputs())
  state, rngs = program.init()
  batch = program.cfg.train.global_batch
  rng = np.random.default_rng(0)
  images = sharding.global_batch(program.mesh, rng.integers(
      0, 255, (batch, program.cfg.data.image_size, program.cfg.data.image_size, 3), np.uint8))
  labels = sharding.global_batch(program.mesh, rng.integers(0, 10, batch).astype(np.int32))
  ahead.result()
  compiles = []

  def listen(name, secs, **kwargs):
    if name.endswith("backend_compile_duration"):
      compiles.append(name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    for _ in range(2):
      state, metrics = program.train_step(state, rngs, {"image": images, "label": labels})
      assert bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert compiles == []
