"""Device mesh and placement rules: sharding as config data over named axes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from internimage_jax.models.stacking import is_stacked

BATCH_AXES = ("data", "fsdp")  # the global batch is split over both


def make_mesh(axes: Mapping[str, int], devices=None) -> Mesh:
  """A mesh over ``axes`` (name -> size, one size may be -1 for "the rest").

  Axis types are Auto on purpose: placement comes from the in/out shardings of the
  jitted step, not from sharding-in-types.
  """
  devices = list(devices if devices is not None else jax.devices())
  names = tuple(axes)
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


def param_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  """FSDP rule: a matrix or kernel (two or more dimensions longer than 1) is split
  along its largest dimension divisible by the ``fsdp`` axis; anything else (norm
  scales, biases, scalars, or no divisible dimension) is replicated.

  Vectors are a negligible share of the parameters, and a channel-sharded vector
  invites XLA to shard the activations it scales by channel too.
  """
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp == 1 or sum(d > 1 for d in shape) < 2:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


@dataclasses.dataclass(frozen=True)
class ParamSharding:
  """``param_spec`` as a function of a shape, for the model (``param_sharding=``):
  scanned levels keep their stacked parameters, and the gradients of each block's
  gathered parameters, split the way the state is."""

  mesh: Mesh

  def __call__(self, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, param_spec(tuple(shape), self.mesh))


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs by the FSDP rule; a
  block-stacked leaf is split like one block's parameter, its block axis kept whole
  (the placement the scanned level gives its stacked parameters)."""

  def place(path, x) -> NamedSharding:
    if is_stacked(path):
      return NamedSharding(mesh, P(None, *param_spec(tuple(x.shape[1:]), mesh)))
    return NamedSharding(mesh, param_spec(tuple(x.shape), mesh))

  return jax.tree_util.tree_map_with_path(place, abstract_state)


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """A process's share of the batch -> one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
