"""The run's checkpoints: background saves that fail loudly, restores that skip damage.

A step's checkpoint is the train state (orbax ``StandardSave``, sharded over processes)
and the input pipeline's position (JSON). Orbax writes each step under a temporary name
and renames it when complete, so a crash, a kill or a full disk never leaves a step that
looks complete; what such an interruption leaves behind (``*.orbax-checkpoint-tmp``) is
removed when the next run opens the directory. A save that fails in the background is
reported at the next step boundary (``check``), not at the next save. A step that cannot
be read back (a truncated file, a lost ``_METADATA``) or holds non-finite values is moved
to ``damaged_checkpoints/`` beside the directory and the next older step is used.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from internimage_jax.training.errors import TrainingError, describe
from internimage_jax.training.processes import barrier, everywhere

DAMAGED_DIR = "damaged_checkpoints"


class UnreadableCheckpoint(ValueError):
  """An orbax state directory whose metadata cannot be read; the message says why."""


class OldLayoutCheckpoint(ValueError):
  """An intact orbax state directory in the model layout of releases before 2026-12-03."""


def stored_shapes(state_dir: Path) -> list[tuple[int, ...]]:
  """The sorted array shapes an orbax ``StandardSave`` directory holds, read from its
  metadata alone; ``UnreadableCheckpoint`` when that cannot be read, and
  ``OldLayoutCheckpoint`` when it holds one entry per block."""
  try:
    with ocp.StandardCheckpointer() as reader:
      stored = reader.metadata(state_dir).item_metadata
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
    raise UnreadableCheckpoint(describe(e)) from None
  if stored is None:
    raise UnreadableCheckpoint("its _METADATA file is missing")
  for path, _ in jax.tree_util.tree_flatten_with_path(stored)[0]:
    keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    if "stacked_blocks" in keys or any(a == "blocks" and b.isdigit()
                                       for a, b in zip(keys, keys[1:])):
      raise OldLayoutCheckpoint(
          "it was written by internimage-jax before levels held their blocks stacked")
  return shapes_of(stored)


def shapes_of(tree) -> list[tuple[int, ...]]:
  """The sorted shapes of a tree's leaves (arrays, shape structs or orbax metadata)."""
  return sorted(tuple(leaf.shape) for leaf in jax.tree.leaves(tree))


class Checkpoints:
  """Saves and restores ``{"state", "data"}`` steps in ``directory`` (all processes)."""

  def __init__(self, directory: Path, *, every_steps: int, keep: int):
    self.directory = Path(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every_steps,
            enable_async_checkpointing=True, cleanup_tmp_directories=True))
    self._in_flight: int | None = None  # the step of the last save started

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  # ----------------------------------------------------------------- saving
  def due(self, step: int) -> bool:
    """Whether ``step`` is one the options save (the interval, or a preemption)."""
    return bool(self.manager.should_save(step))

  def save(self, step: int, state, data: dict) -> None:
    """Starts a background save of ``step`` (the caller decides when: ``due``)."""
    # orbax's save waits for the previous one anyway; waiting here names the step whose
    # save failed, not the step that found out.
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data)), force=True)
    except Exception as e:  # noqa: BLE001 - any failure to start a save stops the run
      raise self._failure(step, e) from None
    self._in_flight = step

  def check(self) -> None:
    """Raises ``TrainingError`` when the last background save has failed."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; ``TrainingError`` if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._failure(self._in_flight, e) from None
    self._in_flight = None

  def _failure(self, step: int | None, error: BaseException) -> TrainingError:
    self._in_flight = None
    self.manager.reload()  # what is complete on disk, not what was started
    latest = self.manager.latest_step()
    newest = (f"the newest complete checkpoint is step {latest}" if latest is not None
              else "no checkpoint is complete")
    return TrainingError(
        f"saving the checkpoint of step {step} in {self.directory} failed ({describe(error)}); "
        f"{newest}; fix the cause (free disk space?) and run the same command to resume")

  def close(self) -> None:
    """Finishes the save in flight (its failure is raised) and releases orbax."""
    try:
      self.wait()
    finally:
      self.manager.close()

  # -------------------------------------------------------------- restoring
  def _unreadable(self, step: int, abstract_state) -> str | None:
    """Why the step's metadata cannot be used, or None; a ``TrainingError`` when it is
    intact but made for another model or optimizer."""
    try:
      stored = stored_shapes(self.directory / str(step) / "state")
    except UnreadableCheckpoint as e:
      return str(e)
    except OldLayoutCheckpoint as e:
      raise TrainingError(
          f"the checkpoint at step {step} in {self.directory} cannot be resumed: {e}; resume "
          "it with the internimage-jax it was written by, or start a new --workdir") from None
    wanted = shapes_of(abstract_state)
    if stored != wanted:
      raise TrainingError(
          f"the checkpoint at step {step} in {self.directory} does not fit this config (it "
          f"holds {len(stored)} arrays, this model and optimizer need {len(wanted)}, "
          "and their shapes differ); use a new --workdir or the old config")
    return None

  def restore(self, abstract_state, all_finite: Callable[[Any], bool]
              ) -> tuple[Any, dict, list[str]] | None:
    """``(state, data, warnings)`` of the newest intact step, or None when there is none.

    Damaged steps newer than it are moved to ``damaged_checkpoints/`` (one warning each);
    when every step is damaged nothing is moved and the error says so.
    """
    damaged: list[tuple[int, str]] = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      problem = self._unreadable(step, abstract_state)
      restored = None
      if problem is None:
        try:
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - a damaged step; older ones may be intact
          problem = describe(e)
      if everywhere(problem is None, f"step {step} read"):
        if all_finite(restored["state"]):  # on every process together: a collective
          return restored["state"], restored["data"], self._set_aside(damaged, step)
        problem = "its state holds non-finite values"
      damaged.append((step, problem or "unreadable on another process"))
    if damaged:
      listed = "; ".join(f"step {s}: {p}" for s, p in damaged)
      raise TrainingError(
          f"no checkpoint in {self.directory} can be restored ({listed}); move them away to "
          "start from scratch, or use a new --workdir")
    return None

  def _set_aside(self, damaged: list[tuple[int, str]], good: int) -> list[str]:
    aside = self.directory.parent / DAMAGED_DIR
    warnings = []
    for step, problem in damaged:
      target = aside / str(step)
      n = 1
      while target.exists():
        target, n = aside / f"{step}.{n}", n + 1
      if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        shutil.move(self.directory / str(step), target)
      warnings.append(f"warning: the checkpoint of step {step} is damaged ({problem}); moved "
                      f"it to {target} and resumed from step {good}")
    if damaged:
      barrier("damaged checkpoints moved")
      self.manager.reload()
    return warnings
