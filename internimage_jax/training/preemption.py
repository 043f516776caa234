"""SIGTERM / SIGINT: stop at the next step boundary, every process at the same step.

Clusters send SIGTERM before they take a job's machines (TPU pods, SLURM, Kubernetes);
a person presses Ctrl-C. A handler notes the signal and the loop asks ``reached()``
after every step. With several processes, the answer is agreed on every step (an
all-gather of one flag per process), since the signal may reach only some of them.

Why not ``multihost_utils.reached_preemption_sync_point``: it matches the count a
caller passes against one past the largest count reported when the notice arrived,
so a notice that arrives before a resumed run's first call (while it compiles) is
never met, and orbax's checkpoint manager calls it too, with its own step numbers.
The handler installed here replaces jax.distributed's SIGTERM watcher for the run.
A second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

WATCHED = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
  """Installed for the duration of a run (a context manager); ``reached()``, called after
  every step on every process, is true at the step every process stops at."""

  def __init__(self):
    self.signal: signal.Signals | None = None
    self._previous: dict[int, object] = {}

  def __enter__(self) -> PreemptionWatch:
    if threading.current_thread() is threading.main_thread():  # where Python runs handlers
      for signum in WATCHED:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait
    self.signal = signal.Signals(signum)

  def reached(self) -> bool:
    """True when the run must save the step it just took and stop (the same answer on
    every process)."""
    noted = self.signal is not None
    if jax.process_count() > 1:
      return bool(np.any(multihost_utils.process_allgather(np.int32(noted))))
    return noted

  @property
  def exit_code(self) -> int:
    """128 + the signal number, the shell's convention for a process stopped by a signal."""
    return 128 + int(self.signal or signal.SIGTERM)

  def describe(self) -> str:
    if self.signal is None:
      return "a signal to another process"
    return self.signal.name
