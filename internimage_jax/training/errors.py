"""Why a run stopped: errors the command line reports in one line."""

from __future__ import annotations

import os
import re


class TrainingError(RuntimeError):
  """A run that cannot go on (bad configuration, non-finite loss, bad checkpoint, a full
  disk); the message says what happened and what to do."""


class Preempted(TrainingError):
  """A preemption signal stopped the run after saving a checkpoint; the same command resumes."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (at most 200 characters), or its type."""
  text = str(error).strip()
  return text.splitlines()[0][:200] if text else type(error).__name__


def describe(error: BaseException) -> str:
  """One line for a failed read or write: the OS error when one is behind it (also the
  errno tensorstore wraps into its messages), else the exception's type and first line."""
  text = str(error)
  code = re.search(r"os_error_code='(\d+)'", text)
  if code:
    return f"{os.strerror(int(code.group(1)))} (errno {code.group(1)})"
  if isinstance(error, OSError) and error.strerror:
    return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
  line = first_line(error).split(" See full TensorStore details")[0].rstrip(".")
  return line if line == type(error).__name__ else f"{type(error).__name__}: {line}"
