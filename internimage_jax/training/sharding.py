"""Device mesh and placement rules: sharding as config data over named axes."""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from internimage_jax.models.partitioning import is_variable, variable_sharding

BATCH_AXES = ("data", "fsdp")  # the global batch is split over both
MESH_AXES = ("data", "fsdp", "model")


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over ``axes`` (name -> size, one size may be -1 for "the rest").

  Axis types are Auto on purpose: placement comes from the in/out shardings of the
  jitted step, not from sharding-in-types.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(axes)
  unknown = [n for n in names if n not in MESH_AXES]
  if unknown:
    raise ValueError(f"mesh {dict(axes)}: unknown axis {unknown[0]!r} (axes: "
                     f"{', '.join(MESH_AXES)})")
  sizes = [int(axes[name]) for name in names]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh {dict(axes)}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if known < 1 or len(devices) % known:
    raise ValueError(f"mesh {dict(axes)} does not divide the {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_size_of(mesh: Mesh) -> int:
  """How many ways the batch is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def state_shardings(abstract_state, mesh: Mesh, rules: Mapping[str, str | None]):
  """NamedShardings for a train state (parameters, optimizer moments, EMA: Variables
  that name their dimensions) by the logical axis ``rules``; the rest is replicated.
  A parameter that a rule cannot split raises ``ValueError`` naming it."""

  def place(path, x) -> NamedSharding:
    if not is_variable(x):
      return NamedSharding(mesh, P())
    try:
      return x.replace(variable_sharding(x, mesh, rules))
    except ValueError as e:
      name = jax.tree_util.keystr(path, simple=True, separator=".")
      raise ValueError(f"{name} of shape {tuple(x.get_value().shape)}: {e}") from None

  return jax.tree_util.tree_map_with_path(place, abstract_state, is_leaf=is_variable)


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """A process's share of the batch -> one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
