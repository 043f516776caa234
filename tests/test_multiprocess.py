"""Multi-process training for real on one machine: jax.distributed over localhost.

Two processes x 4 CPU devices train the quickstart's ``h`` variant (every option of
InternImage-H on a small network) with parameters, gradients and optimizer state
sharded over all 8 devices of both processes; both write the checkpoint; one process
with 8 devices restores it onto another mesh and must get identical values.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import warnings

import numpy as np

from helpers import COLLECTIVE_PATIENCE, train_env

REPO = Path(__file__).resolve().parents[1]
DRIVER = str(REPO / "tests" / "multiprocess_driver.py")
# An error of the gloo transport itself (not its "[Gloo] Rank 0 is connected" lines).
GLOO_FAILURE = re.compile(r"gloo::\w+|Gloo \w+ failed")


def _env(devices: int) -> dict[str, str]:
  # A loaded CI machine (two test workers on two cores, each process with 4 device
  # threads) can hold one process's devices back for long: wait, as on a real cluster,
  # rather than abort a collective after XLA:CPU's default 40 s.
  return dict(train_env(devices, COLLECTIVE_PATIENCE), PYTHONFAULTHANDLER="1")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _train_two_processes(workdir: Path, saved: Path) -> list[tuple[int, str, str]]:
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, DRIVER, "train", str(workdir), str(saved),
       f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def _report(results) -> str:
  # A fatal error's Python stacks (PYTHONFAULTHANDLER) come before a long list of
  # extension modules, which says nothing: leave it out.
  def trimmed(err: str) -> str:
    return re.sub(r"\nExtension modules:.*", "", err, flags=re.S)[-6000:]

  return "\n".join(f"--- process {i}: exit {rc}\nstdout:\n{out[-1500:]}\nstderr:\n{trimmed(err)}"
                   for i, (rc, out, err) in enumerate(results))


def test_fsdp_across_two_processes_restores_onto_another_mesh(tmp_path):
  workdir, saved, restored = tmp_path / "run", tmp_path / "saved.npz", tmp_path / "restored.npz"
  results = _train_two_processes(workdir, saved)
  if any(rc != 0 for rc, _, _ in results) and any(GLOO_FAILURE.search(e) for _, _, e in results):
    # XLA:CPU's cross-process collectives (gloo over TCP) failed once in CI with a
    # message-size mismatch, 512 vs 32 bytes: likely the per-device shares of two of
    # the train step's all-gathers, f32[64,16] and f32[64] (both processes run the same
    # compiled programs in the same order: the HLO is identical across hash seeds;
    # 3 of 3 local runs beside two CPU hogs and 300 rounds of 32 concurrent all-gathers
    # passed). A transport failure is retried once, in a fresh directory, with a
    # warning that carries both processes' logs; anything else, or a second failure,
    # fails the test.
    warnings.warn("two-process training hit a gloo transport error; retrying once:\n"
                  + _report(results))
    workdir = tmp_path / "run_again"
    results = _train_two_processes(workdir, saved)
  for rc, out, _ in results:
    assert rc == 0, _report(results)
    assert ("restored on mesh {'data': 1, 'fsdp': 8, 'model': 1} over 2 process(es)"
            in out), _report(results)
  # Each process wrote its own shards of the checkpoint.
  step_dirs = sorted((workdir / "checkpoints").iterdir())
  assert step_dirs, "no checkpoint written"
  written = {p.name for p in (step_dirs[-1] / "state").iterdir()}
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= written, written

  proc = subprocess.run(
      [sys.executable, DRIVER, "restore", str(workdir), str(restored), "--mesh", "data=2,fsdp=4"],
      cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "restored on mesh {'data': 2, 'fsdp': 4, 'model': 1} over 1 process(es)" in proc.stdout

  want, got = np.load(saved), np.load(restored)
  assert sorted(want.files) == sorted(got.files)
  assert len(want.files) > 100  # params, EMA, optimizer moments, batch stats, step
  assert int(want["['step']"]) == 3  # 0.15 epochs of 1437 images at 64 per step
  options = ("res_post_norm1", "center_feature_scale_proj", "dw_conv", "clip_projector")
  for name in options:  # the H options are really in the trained state
    assert any(name in key for key in want.files), name
  for key in want.files:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
