"""Training that never loses work, and one-line errors (docs/reliability.md).

The runs are the quickstart's, as a user starts them (``train.py`` in a subprocess):
preemption by SIGTERM, a kill, a damaged newest checkpoint, a disk that fills up,
a run that diverges, a second run on a locked workdir.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import (QUICKSTART, REPO, metrics_rows, run_quickstart, train_env,
                     train_losses)
from internimage_jax.training.errors import TrainingError
from internimage_jax.training.workdir import WorkdirLock, _process_start

STEPWISE = ["--config.train.epochs=2", "--config.log_every_steps=1",
            "--config.eval_every_steps=1000", "--config.checkpoint.every_steps=10"]


def _start(workdir: Path, *overrides: str, log: Path) -> subprocess.Popen:
  with log.open("w") as err:
    return subprocess.Popen([sys.executable, *QUICKSTART, "--workdir", str(workdir), *overrides],
                            cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=err)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300) -> None:
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before {what}"
    assert time.time() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


def _steps(workdir: Path) -> list[int]:
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def _purge_steps(tensorboard: Path) -> list[int]:
  """Steps of the SessionLog.START events (TensorBoard's purge marks) in the event files."""
  from tensorboardX.proto.event_pb2 import Event, SessionLog

  steps = []
  for path in sorted(tensorboard.glob("events.out.tfevents.*")):
    data, at = path.read_bytes(), 0
    while at + 12 <= len(data):  # TFRecord: length, its CRC, the record, its CRC
      (length,) = struct.unpack("<Q", data[at:at + 8])
      event = Event.FromString(data[at + 12:at + 12 + length])
      at += 12 + length + 4
      if event.HasField("session_log") and event.session_log.status == SessionLog.START:
        steps.append(event.step)
  return steps


def test_preempted_killed_and_damaged_runs_end_with_the_uninterrupted_losses(tmp_path):
  """SIGTERM saves and exits 143; the lock refuses a second run and is taken over after
  a kill; a damaged newest checkpoint is set aside; metrics hold each step once."""
  reference = tmp_path / "reference"
  run_quickstart(reference, *STEPWISE)
  want = train_losses(reference)

  work, log = tmp_path / "run", tmp_path / "stderr.txt"
  proc = _start(work, *STEPWISE, log=log)
  _wait_for(lambda: 10 in _steps(work), proc, "the first checkpoint")
  with pytest.raises(TrainingError, match=rf"in use by process {proc.pid} on "):
    WorkdirLock(work).acquire()  # what a second run on this workdir is told
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 128 + signal.SIGTERM
  stopped = re.fullmatch(r"preempted: stopped by SIGTERM at step (\d+) of 44; saved (\S+); "
                         r"run the same command to resume\n", log.read_text())
  assert stopped, log.read_text()
  step = int(stopped.group(1))
  assert Path(stopped.group(2)) == work / "checkpoints" / str(step) and step in _steps(work)
  assert not (work / "lock").exists()

  proc = _start(work, *STEPWISE, log=log)  # resumes, and is killed after a newer checkpoint
  _wait_for(lambda: _steps(work)[-1] > step, proc, "a checkpoint after the preemption")
  proc.kill()
  proc.wait()
  assert (work / "lock").exists()  # left behind by the killed run
  newest = _steps(work)[-1]
  data = max((work / "checkpoints" / str(newest) / "state").rglob("d/*"),
             key=lambda p: p.stat().st_size)
  with data.open("r+b") as f:
    f.truncate(100)

  result = run_quickstart(work, *STEPWISE)
  assert f"warning: took over the lock of a run that is gone (process {proc.pid}" in result.stderr
  assert f"the checkpoint of step {newest} is damaged" in result.stderr
  assert (work / "damaged_checkpoints" / str(newest)).is_dir()
  resumed = int(re.search(r"resumed from step (\d+)", result.stdout).group(1))
  assert resumed < newest
  train_steps = [m["step"] for m in metrics_rows(work) if "train/loss" in m]
  assert train_steps == list(range(1, 45))  # each step once, in order
  got = train_losses(work)
  for s, loss in want.items():
    assert got[s] == pytest.approx(loss, rel=1e-6), s
  assert _purge_steps(work / "tensorboard")[-1] == resumed + 1  # TensorBoard drops the rest
  assert not (work / "lock").exists()


def _limit_file_size():
  resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def test_a_failed_save_stops_the_run_and_keeps_the_last_complete_checkpoint(tmp_path):
  """A disk that fills up: files over 1 MiB fail (RLIMIT_FSIZE; the quickstart's data
  files are 2-4 MiB, its metrics and logs far smaller)."""
  short = ["--config.train.epochs=0.5", "--config.checkpoint.every_steps=5"]
  run_quickstart(tmp_path, *short)
  assert _steps(tmp_path) == [10, 11]
  longer = ["--config.train.epochs=1", "--config.checkpoint.every_steps=5"]
  full = run_quickstart(tmp_path, *longer, check=False, cache=False, preexec_fn=_limit_file_size)
  assert full.returncode == 1
  assert full.stderr == (
      f"error: saving the checkpoint of step 15 in {tmp_path / 'checkpoints'} failed (File too "
      "large (errno 27)); the newest complete checkpoint is step 11; fix the cause (free disk "
      "space?) and run the same command to resume\n")
  assert (tmp_path / "checkpoints" / "15.orbax-checkpoint-tmp").is_dir()  # what a full disk left

  again = run_quickstart(tmp_path, *longer)
  assert "resumed from step 11" in again.stdout
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["20", "22"]


def test_a_diverged_run_stops_before_the_update_and_names_a_finite_checkpoint(tmp_path):
  import orbax.checkpoint as ocp

  diverging = ["--config.train.lr=1e30", "--config.train.warmup_epochs=0",
               "--config.train.epochs=0.3", "--config.checkpoint.every_steps=1"]
  first = run_quickstart(tmp_path, *diverging, check=False)
  message = re.fullmatch(
      r"error: the loss \(nan\) or the gradient norm \(nan\) is not finite at step (\d+); "
      r"stopped without applying it\. The newest checkpoint, step (\d+) in (\S+), holds only "
      r"finite values .*\n", first.stderr)
  assert first.returncode == 1 and message, first.stderr
  bad, good = int(message.group(1)), int(message.group(2))
  assert good == bad - 1 and _steps(tmp_path) [-1] == good
  with ocp.StandardCheckpointer() as reader:
    state = reader.restore(tmp_path / "checkpoints" / str(good) / "state")
  leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(state)]
  assert all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))
  again = run_quickstart(tmp_path, *diverging, check=False)  # the same message, no loop
  assert again.returncode == 1 and again.stderr == first.stderr


def test_workdir_lock_refuses_live_runs_and_takes_over_dead_ones(tmp_path):
  lock = WorkdirLock(tmp_path)
  record = dict(lock._record(), pid=os.getppid(), process_start=_process_start(os.getppid()))
  (tmp_path / "lock").write_text(json.dumps(record))  # a live process on this host
  refused = run_quickstart(tmp_path, check=False)
  assert refused.returncode == 1 and refused.stderr.count("\n") == 1
  assert refused.stderr.startswith(f"error: workdir {tmp_path} is in use by process "
                                   f"{os.getppid()} on {socket.gethostname()} since ")
  # The same pid with another start time: a dead run's pid reused (a restarted container).
  (tmp_path / "lock").write_text(json.dumps(dict(record, process_start="1")))
  assert "took over the lock of a run that is gone" in lock.acquire()
  lock.release()
  assert not (tmp_path / "lock").exists()
  (tmp_path / "lock").write_text(json.dumps(dict(record, host="elsewhere")))
  with pytest.raises(TrainingError, match="on elsewhere since"):
    lock.acquire()  # another host's process cannot be checked: never taken over
  (tmp_path / "lock").write_text("{not json")
  assert "took over an unreadable lock" in lock.acquire()


@pytest.mark.parametrize("args, message", [
    (["--config.train.globl_batch=8"],
     "error: unknown config key globl_batch in an override (did you mean global_batch?)"),
    (["--config", "configs/nope.py"], "error: config file not found: configs/nope.py"),
    (["--config", "configs/quickstart.py:zzz"],
     "error: config configs/quickstart.py:zzz: ValueError: unknown quickstart variant 'zzz'; "
     "choose '', 'fsdp' or 'h'"),
    (["--config.data.eval_batch=63", "--config.mesh.data=2"],
     "error: config.data.eval_batch 63 is not divisible by the 2-way data-parallel split of "
     "mesh {'data': 2, 'fsdp': 1, 'model': 1}"),
])
def test_command_line_errors_are_one_line(tmp_path, args, message):
  result = run_quickstart(tmp_path / "w", *args, devices=2, check=False)
  assert result.returncode == 1 and result.stderr == message + "\n"


def test_an_unusable_workdir_is_one_line_and_verbose_shows_the_traceback(tmp_path):
  (tmp_path / "file").write_text("")
  result = run_quickstart(tmp_path / "file" / "w", check=False)
  assert result.returncode == 1
  assert result.stderr == f"error: cannot create --workdir {tmp_path / 'file' / 'w'}: " \
                          "Not a directory\n"
  verbose = run_quickstart(tmp_path / "file" / "w", "--verbose", check=False)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr
