"""Agreement between the processes of a multi-process run.

XLA:CPU runs cross-process collectives over gloo, which gives a new group of devices
30 s (a fixed limit) for every process to arrive. Processes drift further apart than
that while they compile: one may load a program from the persistent compilation cache
(only process 0 writes it) while another compiles it for a minute. So agreement goes
through jax.distributed's coordination service, which waits as long as asked, and each
program is compiled before its first run and then started by all processes together
(``Program``, which also compiles ahead in the background for one process or many).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
from orbax.checkpoint import multihost

PATIENCE_MS = 30 * 60 * 1000  # a slow process (a cold compile of the largest model)
_rounds = itertools.count()  # every process makes the same calls in the same order
# Compiles in the background. Workers are joined at exit: a compile in flight finishes
# first rather than being torn down inside XLA.
_COMPILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="compile")


def _key(name: str) -> str:
  return f"internimage_jax/{next(_rounds)}/{name.replace(' ', '_')}"


def barrier(name: str) -> None:
  """Returns when every process has called it (at once with one process)."""
  if jax.process_count() > 1:
    multihost.get_jax_distributed_client().wait_at_barrier(_key(name), PATIENCE_MS)


def everywhere(ok: bool, name: str = "agree") -> bool:
  """True when ``ok`` holds on every process."""
  if jax.process_count() == 1:
    return ok
  client, key = multihost.get_jax_distributed_client(), _key(name)
  client.key_value_set(f"{key}/{jax.process_index()}", "1" if ok else "0")
  return all(client.blocking_key_value_get(f"{key}/{p}", PATIENCE_MS) == "1"
             for p in range(jax.process_count()))


def _signature(args) -> tuple:
  """What a compiled executable is specific to: tree, shapes, dtypes and placements.
  Arrays and ``jax.ShapeDtypeStruct`` with the same placement give the same signature."""
  leaves, treedef = jax.tree.flatten(args)
  return treedef, tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)


def _finished(value: Any) -> Future:
  future: Future = Future()
  future.set_result(value)
  return future


class Program:
  """A jitted function run as compiled executables, one per input signature.

  ``compile_ahead`` compiles it in a background thread, so that the train step compiles
  while the init compiles and runs (XLA compiles outside the GIL). With several
  processes, a program is compiled before its first run on each new signature and then
  started once every process has compiled it. With one process and nothing compiled
  ahead, calls go straight to the jitted function.
  """

  def __init__(self, jitted: Callable[..., Any], name: str):
    self._jitted, self._name = jitted, name
    self._compiled: dict[Any, Future] = {}
    self._started: set[Any] = set()

  def lower(self, *args):
    return self._jitted.lower(*args)

  def compile_ahead(self, *args) -> Future:
    """Starts compiling for ``args`` (arrays or ``jax.ShapeDtypeStruct`` with their
    shardings); the future's result is the executable. A compile error is raised here
    by ``result()`` or at the first call with that signature."""
    key = _signature(args)
    if key not in self._compiled:
      self._compiled[key] = _COMPILER.submit(lambda: self._jitted.lower(*args).compile())
    return self._compiled[key]

  def __call__(self, *args):
    if not self._compiled and jax.process_count() == 1:
      return self._jitted(*args)
    key = _signature(args)
    future = self._compiled.get(key)
    if future is None:
      if jax.process_count() == 1:
        return self._jitted(*args)
      future = self._compiled[key] = _finished(self._jitted.lower(*args).compile())
    compiled = future.result()
    if key not in self._started:
      barrier(f"{self._name} compiled")
      self._started.add(key)
    return compiled(*args)
