"""The train state's layout of block parameters: one array per level and kind.

A scanned level runs its blocks as one ``lax.scan`` over their parameters stacked
along a new leading axis. Keeping the train state (parameters, optimizer moments,
EMA) in that layout too makes the optimizer update, the EMA and the gradient norm,
which XLA compiles array by array, as large for H's 50 blocks as for 12: each level
holds one array per parameter kind, whatever its depth.

The model keeps one module per block (official names, conversion, checkpoints of
weights); :func:`unstack_blocks` gives it that view inside the step. The pair
compiles to slices of the stacked arrays that the level's scan stacks again, which
XLA folds away, and the gradients come back stacked.

Stacked paths replace ``levels/<l>/blocks/<j>/<rest>`` by
``levels/<l>/stacked_blocks/<rest>`` with the block index as the leading axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

STACKED = "stacked_blocks"


def _block_position(path: tuple) -> int | None:
  """Index of "blocks" in ``levels/<l>/blocks/<j>/...``, or None for other paths."""
  if len(path) > 4 and path[0] == "levels" and path[2] == "blocks" and isinstance(path[3], int):
    return 2
  return None


def _unwrap(leaf):
  return leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf


def _rewrap(like, value):
  return like.replace(value) if isinstance(like, nnx.Variable) else value


def stack_blocks(state: nnx.State,
                 combine: Callable[[Sequence[Any]], Any] = jnp.stack) -> nnx.State:
  """Per-block leaves of ``state`` (a model's, or a tree like it) stacked per level.

  ``combine`` turns the blocks' values, in block order, into the stacked value.
  """
  groups: dict[tuple, dict[int, Any]] = {}
  out = []
  for path, leaf in nnx.to_flat_state(state):
    i = _block_position(path)
    if i is None:
      out.append((path, leaf))
      continue
    groups.setdefault(path[:i] + (STACKED,) + path[i + 2:], {})[path[i + 1]] = leaf
  for path, members in groups.items():
    if sorted(members) != list(range(len(members))):
      raise ValueError(f"stack_blocks: {'/'.join(map(str, path))} is missing in blocks "
                       f"{sorted(set(range(max(members) + 1)) - set(members))}")
    leaves = [members[j] for j in range(len(members))]
    out.append((path, _rewrap(leaves[0], combine([_unwrap(x) for x in leaves]))))
  return nnx.from_flat_state(out)


def unstack_blocks(state: nnx.State) -> nnx.State:
  """The inverse of :func:`stack_blocks`: one leaf per block again."""
  out = []
  for path, leaf in nnx.to_flat_state(state):
    if STACKED not in path:
      out.append((path, leaf))
      continue
    i = path.index(STACKED)
    value = _unwrap(leaf)
    if isinstance(value, np.ndarray):  # host values stay on the host, in their dtype
      pieces = np.split(value, value.shape[0])
    else:
      # lax.split, not indexing: its transpose is one concatenate of the blocks'
      # gradients, where indexing would add a full-size padded copy per block.
      pieces = jax.lax.split(value, [1] * value.shape[0], axis=0)
    out += [(path[:i] + ("blocks", j) + path[i + 1:], _rewrap(leaf, piece.reshape(piece.shape[1:])))
            for j, piece in enumerate(pieces)]
  return nnx.from_flat_state(out)


def key_names(key_path: Sequence) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as names (``("levels", "0", "blocks", ...)``), without
  the attribute that holds a Variable's value."""
  names = []
  for k in key_path:
    if isinstance(k, jax.tree_util.DictKey):
      names.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      names.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey) and k.name not in ("value", "raw_value"):
      names.append(k.name)
  return tuple(names)


def map_params(fn: Callable[[tuple[str, ...], Any], Any], tree):
  """``fn(names, array)`` over the arrays of a state (names as :func:`key_names`)."""
  return jax.tree_util.tree_map_with_path(lambda path, x: fn(key_names(path), x), tree)


def is_stacked(names: Sequence[str]) -> bool:
  """Whether the leaf at ``names`` (as :func:`key_names`) is block-stacked."""
  return STACKED in names


def block_ndim(names: Sequence[str], x) -> int:
  """Rank of one block's parameter: the stacked leading axis not counted."""
  return x.ndim - is_stacked(names)
