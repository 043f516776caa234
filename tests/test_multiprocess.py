"""Multi-process training for real on one machine: jax.distributed over localhost.

Two processes x 4 CPU devices train the quickstart's ``h`` variant (every option of
InternImage-H on a small network) with parameters, gradients and optimizer state
sharded over all 8 devices of both processes; both write the checkpoint; one process
with 8 devices restores it onto another mesh and must get identical values.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DRIVER = str(REPO / "tests" / "multiprocess_driver.py")


def _env(devices: int) -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


def test_fsdp_across_two_processes_restores_onto_another_mesh(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  workdir, saved, restored = tmp_path / "run", tmp_path / "saved.npz", tmp_path / "restored.npz"
  procs = [subprocess.Popen(
      [sys.executable, DRIVER, "train", str(workdir), str(saved),
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
    assert "restored on mesh {'data': 1, 'fsdp': 8} over 2 process(es)" in out, out[-2000:]
  # Each process wrote its own shards of the checkpoint.
  step_dirs = sorted((workdir / "checkpoints").iterdir())
  assert step_dirs, "no checkpoint written"
  written = {p.name for p in (step_dirs[-1] / "state").iterdir()}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, written

  proc = subprocess.run(
      [sys.executable, DRIVER, "restore", str(workdir), str(restored), "--mesh", "data=2,fsdp=4"],
      cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored on mesh {'data': 2, 'fsdp': 4} over 1 process(es)" in proc.stdout

  want, got = np.load(saved), np.load(restored)
  assert sorted(want.files) == sorted(got.files)
  assert len(want.files) > 100  # params, EMA, optimizer moments, batch stats, step
  assert int(want["['step']"]) == 3  # 0.15 epochs of 1437 images at 64 per step
  options = ("res_post_norm1", "center_feature_scale_proj", "dw_conv", "clip_projector")
  for name in options:  # the H options are really in the trained state
    assert any(name in key for key in want.files), name
  for key in want.files:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
