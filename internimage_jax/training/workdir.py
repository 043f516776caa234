"""One run per workdir: a lock file naming the run that holds it.

``workdir/lock`` holds the host name, process id and start time of the run (process 0
of a multi-process job). A second run on the same workdir refuses to start; a lock left
by a run that died (its process is gone from this host, or the host rebooted) is taken
over with a warning. A lock from another host cannot be checked and is never taken over.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

from internimage_jax.training.errors import TrainingError

LOCK_NAME = "lock"


def _boot_id() -> str:
  try:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
  try:
    stat = Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return ""
  return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in () may hold spaces


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  return True


class WorkdirLock:
  """``acquire()`` or a ``TrainingError`` naming the holder; ``release()`` at exit."""

  def __init__(self, workdir: Path):
    self.path = Path(workdir) / LOCK_NAME
    self.held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid,
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "boot_id": _boot_id(), "process_start": _process_start(pid)}

  def _stale(self, holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
      return False
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
      return True  # this host rebooted since
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
      return True
    # A live process with that pid but another start time reuses a dead run's pid (a
    # restarted container gets the same small pids again).
    started = holder.get("process_start")
    return bool(started) and started != _process_start(pid)

  def acquire(self) -> str | None:
    """Takes the lock; returns a warning when a dead run's lock was taken over."""
    warning = None
    # Written whole under a temporary name, then linked: the lock never exists half-written.
    staged = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    staged.write_text(json.dumps(self._record()))
    try:
      for _ in range(2):
        try:
          os.link(staged, self.path)
        except FileExistsError:
          holder = self._read()
          if holder is not None and not self._stale(holder):
            raise TrainingError(
                f"workdir {self.path.parent} is in use by process {holder.get('pid')} on "
                f"{holder.get('host')} since {holder.get('started')}; wait for it, stop it, "
                f"or use another --workdir (if that run is gone, delete {self.path})") from None
          what = ("an unreadable lock" if holder is None else
                  f"the lock of a run that is gone (process {holder.get('pid')} on "
                  f"{holder.get('host')}, since {holder.get('started')})")
          warning = f"warning: took over {what} in {self.path.parent}"
          self.path.unlink(missing_ok=True)
          continue
        self.held = True
        return warning
    finally:
      staged.unlink(missing_ok=True)
    raise TrainingError(f"could not take the lock {self.path}: another run took it just now")

  def _read(self) -> dict | None:
    try:
      holder = json.loads(self.path.read_text())
    except (OSError, ValueError):
      return None
    return holder if isinstance(holder, dict) else None

  def release(self) -> None:
    if self.held:
      holder = self._read()
      if holder is not None and holder.get("pid") == os.getpid():
        self.path.unlink(missing_ok=True)
      self.held = False
