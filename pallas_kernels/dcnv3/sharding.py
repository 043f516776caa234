"""The DCNv3 operator on a device mesh: one call per device (``shard_map``).

To XLA's SPMD partitioner a Pallas kernel is an opaque custom call: handed
batch-sharded operands, it gathers them onto every device and reduces their gradients
there. The operator needs no communication at all when its operands are split by
image or by group: an output pixel-group reads only its own image's rows of its own
group. So the operator runs inside ``jax.shard_map`` over the mesh axes that split
the batch (and, where the operands are typed so, the groups), each device sampling
its own images with the kernel or the fallback.

Which axes split the batch, in order of precedence:

1. ``batch_axes=`` given by the caller (a model that knows its activation sharding);
2. the operands' sharding type, under Explicit mesh axes (``jax.make_mesh``'s
   default): the axes of the first dimension of ``x``, and those of its channel
   dimension for groups;
3. the mesh set with ``jax.set_mesh`` (or passed as ``mesh=``) under Auto axes: every
   Auto axis of the mesh (sizes above 1), when the batch divides by their product.

Axes already manual (inside an enclosing ``shard_map``) are per-device already and
are left alone. Height and width cannot be split without exchanging halos of
unbounded size (offsets are learned), so operands typed that way are an error that
names the axis.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels.dcnv3.params import DCNv3Params

AnyMesh = Mesh | AbstractMesh
Operator = Callable[[jax.Array, jax.Array, jax.Array, DCNv3Params], jax.Array]
_DIM_NAMES = ("batch", "height", "width", "channels")


@dataclasses.dataclass(frozen=True)
class Placement:
  """How the operator's operands are split over a mesh: the batch over
  ``batch_axes``, the groups (channel dimension) over ``group_axes``."""

  mesh: AnyMesh
  batch_axes: tuple[str, ...]
  group_axes: tuple[str, ...] = ()

  def ways(self, axes: Sequence[str]) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  @property
  def spec(self) -> P:
    """The spec of ``x``, ``offset``, ``mask`` and the output alike."""
    entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else tuple(axes)
    return P(entry(self.batch_axes), None, None, entry(self.group_axes))


def entry_axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of axis names."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _typed_spec(array: jax.Array) -> P | None:
  """The partition spec in ``array``'s type (Explicit axes), if any."""
  sharding = getattr(jax.typeof(array), "sharding", None)
  spec = getattr(sharding, "spec", None)
  if spec is None or not any(entry_axes(e) for e in spec):
    return None
  return spec


def _context_mesh() -> AbstractMesh | None:
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh is None or mesh.empty else mesh


def placement(
    x: jax.Array, params: DCNv3Params, *, mesh: AnyMesh | None = None,
    batch_axes: str | Sequence[str] | None = None,
) -> Placement | None:
  """Where the operator's operands live, or ``None`` when they are not split (one
  device, no mesh known, or only per-device axes left)."""
  typed = _typed_spec(x)
  if mesh is None:
    typed_mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    mesh = typed_mesh if typed is not None else _context_mesh()
  if mesh is None:
    if batch_axes:
      raise ValueError(f"dcnv3: batch_axes={batch_axes!r} needs a mesh: pass mesh= or set "
                       "one with jax.set_mesh")
    return None
  manual = {name for name, kind in zip(mesh.axis_names, mesh.axis_types)
            if kind == AxisType.Manual}
  group_axes: tuple[str, ...] = ()
  if batch_axes is not None:
    axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    for name in axes:
      if name not in mesh.axis_names:
        raise ValueError(f"dcnv3: batch axis {name!r} is not an axis of the mesh "
                         f"{dict(mesh.shape)}")
      if name in manual:
        raise ValueError(f"dcnv3: batch axis {name!r} is already manual here (inside "
                         "shard_map): the operands are per-device on it")
  elif typed is not None:
    for dim in (1, 2):
      for name in entry_axes(typed[dim]):
        raise ValueError(
            f"dcnv3: x is sharded over mesh axis {name!r} along its {_DIM_NAMES[dim]}; the "
            "operator samples anywhere in the image (learned offsets), so split the batch "
            "or the channels (whole groups) instead")
    axes = entry_axes(typed[0])
    group_axes = entry_axes(typed[3])
  else:
    axes = tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types)
                 if kind == AxisType.Auto and mesh.shape[name] > 1)
    if axes and x.shape[0] % math.prod(mesh.shape[a] for a in axes):
      return None  # the batch cannot be split evenly: the whole-array call
  result = Placement(mesh, tuple(a for a in axes if mesh.shape[a] > 1),
                     tuple(a for a in group_axes if mesh.shape[a] > 1))
  if result.ways(result.batch_axes) * result.ways(result.group_axes) == 1:
    return None
  if x.shape[0] % result.ways(result.batch_axes):
    raise ValueError(f"dcnv3: the batch ({x.shape[0]}) does not divide over mesh axes "
                     f"{result.batch_axes} ({result.ways(result.batch_axes)} ways)")
  if params.group % result.ways(result.group_axes):
    raise ValueError(
        f"dcnv3: x's channels are split {result.ways(result.group_axes)} ways over mesh axes "
        f"{result.group_axes}, which does not divide its {params.group} groups; split the "
        "channels by whole groups")
  return result


def per_device(op: Operator, where: Placement, x: jax.Array, offset: jax.Array,
               mask: jax.Array, params: DCNv3Params) -> jax.Array:
  """``op`` on each device's images (and groups) of ``x``, ``offset`` and ``mask``."""
  local = dataclasses.replace(params, group=params.group // where.ways(where.group_axes))
  spec = where.spec
  used = set(where.batch_axes + where.group_axes)
  if any(kind == AxisType.Explicit for name, kind in
         zip(where.mesh.axis_names, where.mesh.axis_types) if name in used):
    # Typed operands must carry the specs shard_map is given (offset and mask may come
    # in replicated while x is split, or the caller named other batch axes).
    x, offset, mask = (a if _typed_spec(a) == spec else jax.sharding.reshard(a, spec)
                       for a in (x, offset, mask))
  fn = jax.shard_map(lambda a, b, c: op(a, b, c, local), mesh=where.mesh,
                     in_specs=(spec, spec, spec), out_specs=spec,
                     axis_names=used, check_vma=False)
  return fn(x, offset, mask)
