"""Logical axis names on parameters, and their placement on a mesh by a rule table.

Every parameter names its dimensions (flax's ``out_sharding`` metadata): ``layers`` (a
level's stacked blocks), ``embed`` (channels: what FSDP splits), ``mlp`` (the MLP's
hidden units), ``heads`` (the clip projector's attention features) or ``None``. A rule
table maps names to mesh axes, as MaxText's ``logical_axis_rules``; the training config
holds it, the model only reads it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels.dcnv3.sharding import entry_axes

# Channels over "fsdp"; the MLP and the clip projector's attention Megatron style over
# "model" (their hidden activations stay split between a pair of linears, one all-reduce
# joins each pair's output). Vectors are never split over "fsdp": they are small, and a
# channel-split scale invites XLA to split the activations by channel too.
DEFAULT_RULES: dict[str, str | None] = {"layers": None, "embed": "fsdp", "mlp": "model",
                                        "heads": "model"}
# Mesh axes that split a dimension only where they divide it: FSDP stores parameters
# split and gathers them for use, so an odd size just stays whole. Any other axis
# (tensor parallelism) decides how the computation is split, so it must divide.
WHERE_DIVISIBLE = ("data", "fsdp")
# How nnx.vmap names the axis it stacks a level's blocks along.
LAYERS = {nnx.PARTITION_NAME: "layers"}


def with_axes(init: nnx.Initializer, *names: str | None) -> nnx.Initializer:
  """``init`` whose parameter names its dimensions ``names``. Not placed when created
  (flax's eager sharding): the jitted init's out-shardings place the whole state."""
  return nnx.with_metadata(init, out_sharding=names, eager_sharding=False)


def param(value: jax.Array, *names: str | None) -> nnx.Param:
  return nnx.Param(value, out_sharding=names, eager_sharding=False)


def axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
  """The logical names of a Variable's dimensions, right-aligned to its value: a slice
  of a stacked parameter (one block's, inside a scan) drops the leading ``layers``."""
  names = tuple(variable.get_metadata().get("out_sharding") or ())
  ndim = len(variable.get_value().shape)
  return (None,) * (ndim - len(names)) + names[max(len(names) - ndim, 0):]


def stacked_dims(variable: nnx.Variable) -> int:
  """How many leading dimensions of a Variable are stacked layers."""
  return axes_of(variable).count("layers")


def logical_spec(names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                 rules: Mapping[str, str | None]) -> P:
  """Mesh axes of a value whose dimensions are ``names``: each name's rule, where the
  mesh has that axis (larger than 1) and no earlier dimension took it. An axis of
  ``WHERE_DIVISIBLE`` that does not divide the dimension leaves it whole; any other
  raises ``ValueError``."""
  spec: list[str | None] = []
  for dim, (name, size) in enumerate(zip(names, shape)):
    axis = rules.get(name) if name else None
    ways = mesh.shape.get(axis, 1) if axis else 1
    usable = ways > 1 and axis not in spec
    if usable and size % ways and axis not in WHERE_DIVISIBLE:
      raise ValueError(f"dimension {dim} ({name}, size {size}) cannot split {ways} ways over "
                       f"mesh axis {axis!r}")
    spec.append(axis if usable and size % ways == 0 else None)
  return P(*spec)


def variable_sharding(variable: nnx.Variable, mesh: jax.sharding.Mesh,
                      rules: Mapping[str, str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(axes_of(variable), variable.get_value().shape,
                                          mesh, rules))


def gather_param(x: jax.Array, full: NamedSharding, split: NamedSharding) -> jax.Array:
  """``x`` placed ``full`` for its use, its gradient ``split`` (the FSDP all-gather,
  whose transpose is a reduce-scatter, not an all-reduce of the whole gradient)."""
  gather = jax.custom_vjp(lambda x: jax.lax.with_sharding_constraint(x, full))
  gather.defvjp(lambda x: (gather(x), None),
                lambda _, g: (jax.lax.with_sharding_constraint(g, split),))
  return gather(x)


def batch_axes(activations: NamedSharding) -> tuple[str, ...]:
  """The mesh axes that an activation sharding splits the batch (leading) dimension over."""
  return entry_axes(activations.spec[0] if activations.spec else None)


def is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a model's activations and parameters live on a mesh (hashable: it is part
  of the module definition), or nowhere in particular (no ``activations``).

  Activations are split over the batch as ``activations`` says; parameters are kept
  as ``rules`` say, and gathered for use over the batch axes (FSDP, one block at a
  time), still split by the other rules (tensor parallelism).
  """

  activations: NamedSharding | None = None
  rules: tuple[tuple[str, str | None], ...] = ()

  @classmethod
  def of(cls, activations: NamedSharding | None,
         rules: Mapping[str, str | None] | None) -> Placement:
    rules = DEFAULT_RULES if rules is None else rules
    return cls(activations, tuple(sorted(dict(rules).items())) if activations else ())

  def constrain(self, x: jax.Array) -> jax.Array:
    # With parameters split (FSDP), XLA could otherwise split activations by channel
    # instead of gathering the weights.
    if self.activations is None:
      return x
    return jax.lax.with_sharding_constraint(x, self.activations)

  def gather(self, state: nnx.State) -> nnx.State:
    """Parameters placed for their use (their gradients reduce-scattered back)."""
    if self.activations is None:
      return state
    mesh, rules = self.activations.mesh, dict(self.rules)
    at_use = {k: v for k, v in rules.items() if v not in batch_axes(self.activations)}

    def one(v: nnx.Variable) -> nnx.Variable:
      full, split = variable_sharding(v, mesh, at_use), variable_sharding(v, mesh, rules)
      return v.replace(gather_param(v.get_value(), full, split))

    return jax.tree.map(one, state, is_leaf=is_variable)
