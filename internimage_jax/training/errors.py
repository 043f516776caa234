"""Why a run stopped: errors the command line reports in one line."""

from __future__ import annotations


class TrainingError(RuntimeError):
  """A run that cannot go on (bad configuration, non-finite loss, bad checkpoint, a full
  disk); the message says what happened and what to do."""


class Preempted(TrainingError):
  """A preemption signal stopped the run after saving a checkpoint; the same command resumes."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code
