"""Device mesh and placement rules: sharding as config data over named axes."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from internimage_jax.models.stacking import is_stacked, map_params

BATCH_AXES = ("data", "fsdp")  # the global batch is split over both
MESH_AXES = ("data", "fsdp", "model")

# Tensor parallelism over the "model" axis, Megatron style: the MLP's first linear and
# the clip projector's q/k/v split their outputs, the MLP's second linear and the
# projector's output projection their inputs. The hidden activations then stay split
# between the pair and one all-reduce joins each pair's output. Parameter-name suffix
# -> the dimension split over "model" (biases follow their outputs).
TENSOR_PARALLEL = {
    ("mlp", "fc1", "kernel"): 1, ("mlp", "fc1", "bias"): 0, ("mlp", "fc2", "kernel"): 0,
    ("cross_dcn", "q", "kernel"): 1, ("cross_dcn", "k", "kernel"): 1,
    ("cross_dcn", "v", "kernel"): 1, ("cross_dcn", "q_bias"): 0, ("cross_dcn", "k_bias"): 0,
    ("cross_dcn", "v_bias"): 0, ("cross_dcn", "proj", "kernel"): 0,
}


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


def tensor_parallel_dim(shape: tuple[int, ...], mesh: Mesh, names: tuple[str, ...] = ()
                        ) -> int | None:
  """The dimension of parameter ``names`` split over the ``model`` axis, if any."""
  ways = mesh.shape.get("model", 1)
  if ways == 1:
    return None
  for suffix, dim in TENSOR_PARALLEL.items():
    if tuple(names[-len(suffix):]) == suffix:
      if shape[dim] % ways:
        raise ValueError(f"tensor parallelism: {'.'.join(names)} of shape {shape} cannot "
                         f"split dimension {dim} {ways} ways (mesh model={ways})")
      return dim
  return None


def param_spec(shape: tuple[int, ...], mesh: Mesh, names: tuple[str, ...] = ()) -> P:
  """Where parameter ``names`` of ``shape`` lives. Tensor parallelism first (the
  ``TENSOR_PARALLEL`` dimension over ``model``); then the FSDP rule: a matrix or kernel
  (two or more dimensions longer than 1) is split along its largest other dimension
  divisible by the ``fsdp`` axis; anything else (norm scales, biases, scalars, or no
  divisible dimension) is not split over ``fsdp``.

  Vectors are a negligible share of the parameters, and a channel-sharded vector
  invites XLA to shard the activations it scales by channel too.
  """
  spec: list[str | None] = [None] * len(shape)
  tp = tensor_parallel_dim(shape, mesh, names)
  if tp is not None:
    spec[tp] = "model"
  fsdp = mesh.shape.get("fsdp", 1)
  if fsdp > 1 and sum(d > 1 for d in shape) >= 2:
    for dim in np.argsort(shape)[::-1]:
      if dim != tp and shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
        spec[dim] = "fsdp"
        break
  return P(*spec) if any(spec) else P()


def use_spec(shape: tuple[int, ...], mesh: Mesh, names: tuple[str, ...] = ()) -> P:
  """Where parameter ``names`` is placed for its use: gathered over ``fsdp``, still
  split over ``model`` for tensor parallelism."""
  tp = tensor_parallel_dim(shape, mesh, names)
  if tp is None:
    return P()
  return P(*("model" if d == tp else None for d in range(len(shape))))


@dataclasses.dataclass(frozen=True)
class ParamSharding:
  """The placement rules for the model (``param_sharding=``), by parameter shape and
  name: ``param_sharding(shape, names)`` is where the state keeps it (scanned levels
  place their stacked parameters, and each block's gradients, so); ``at_use`` is
  where a block gathers it to compute."""

  mesh: Mesh

  def __call__(self, shape: tuple[int, ...], names: tuple[str, ...] = ()) -> NamedSharding:
    return NamedSharding(self.mesh, param_spec(tuple(shape), self.mesh, names))

  def at_use(self, shape: tuple[int, ...], names: tuple[str, ...] = ()) -> NamedSharding:
    return NamedSharding(self.mesh, use_spec(tuple(shape), self.mesh, names))


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a pytree of arrays/ShapeDtypeStructs by the FSDP rule; a
  block-stacked leaf is split like one block's parameter, its block axis kept whole
  (the placement the scanned level gives its stacked parameters)."""

  def place(names, x) -> NamedSharding:
    if is_stacked(names):
      return NamedSharding(mesh, P(None, *param_spec(tuple(x.shape[1:]), mesh, names)))
    return NamedSharding(mesh, param_spec(tuple(x.shape), mesh, names))

  return map_params(place, abstract_state)


def global_batch(mesh: Mesh, local: np.ndarray) -> jax.Array:
  """A process's share of the batch -> one global array sharded over the batch axes."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local)
