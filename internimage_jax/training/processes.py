"""Agreement between the processes of a multi-process run.

XLA:CPU runs cross-process collectives over gloo, which gives a new group of devices
30 s (a fixed limit) for every process to arrive. Processes drift further apart than
that while they compile: one may load a program from the persistent compilation cache
(only process 0 writes it) while another compiles it for a minute. So agreement goes
through jax.distributed's coordination service, which waits as long as asked, and each
program is compiled before its first run and then started by all processes together.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
from orbax.checkpoint import multihost

PATIENCE_MS = 30 * 60 * 1000  # a slow process (a cold compile of the largest model)
_rounds = itertools.count()  # every process makes the same calls in the same order


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


class StartedTogether:
  """A jitted program that, with several processes, is compiled before its first run on
  each new input signature, and then run once every process has compiled it."""

  def __init__(self, jitted: Callable[..., Any], name: str):
    self._jitted, self._name = jitted, name
    self._compiled: dict[Any, Callable[..., Any]] = {}

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self._jitted(*args)
    leaves, treedef = jax.tree.flatten(args)
    signature = (treedef, tuple((x.shape, x.dtype, x.sharding) for x in leaves))
    compiled = self._compiled.get(signature)
    if compiled is None:
      compiled = self._compiled[signature] = self._jitted.lower(*args).compile()
      barrier(f"{self._name} compiled")
    return compiled(*args)
