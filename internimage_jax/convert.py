"""Official PyTorch weights <-> Flax NNX InternImage (and the mmseg UperNet segmentor:
``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``).

Names follow the official ``state_dict`` (spec section 5). ``OFFICIAL_NAMES`` says how
each module's children are named there, so the same mapping serves a whole network or
a single DCNv3 module with keys relative to it; a level's stacked blocks (and H's and
G's stacked post-norms) are one official entry per block, split on save and stacked on
load.

Command line, official file -> orbax checkpoint directory::

    python -m internimage_jax.convert --model internimage_t --checkpoint X.pth --out DIR

and an orbax directory (or any readable weights file) -> official-layout safetensors::

    python -m internimage_jax.convert --model internimage_t --checkpoint DIR --out X.safetensors
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.internimage import (
    AttentionPooling, Block, Downsample, InternImage, Level, Stem)
from internimage_jax.models.segmentation.heads import PoolingBranch
from internimage_jax.training.errors import describe, first_line

# Each module's children -> their official path relative to it. "{}" is the index along
# the leading (stacked ``layers``) axis of every variable below that child.
OFFICIAL_NAMES: dict[type, dict[str, str]] = {
    Stem: {"norm1": "norm1.1", "norm2": "norm2.1"},
    Downsample: {"norm": "norm.1"},
    Block: {"norm1": "norm1.0", "norm2": "norm2.0", "res_post_norm1": "res_post_norm1.0",
            "res_post_norm2": "res_post_norm2.0"},
    Level: {"blocks": "blocks.{}", "norm": "norm.0", "post_norms": "post_norms.{}.0"},
    DCNv3: {"dw_conv": "dw_conv.0", "dw_norm": "dw_conv.1.1"},
    AttentionPooling: {"norm1_q": "norm1_q.0", "norm1_k": "norm1_k.0", "norm1_v": "norm1_v.0"},
    InternImage: {"conv_head": "conv_head.0", "head_norm": "conv_head.1.0",
                  "dcnv3_head_x4": "dcnv3_head_x4.0", "fc_norm": "fc_norm.0"},
    # mmseg's PPM branch is Sequential(AdaptiveAvgPool2d, ConvModule).
    PoolingBranch: {"conv_module": "1"},
}

# Leaf names of flax's own layers -> the PyTorch parameter name.
_FLAX_LEAVES = {"kernel": "weight", "scale": "weight"}
# Keys an official file may carry that hold no weights of ours to check.
_OPTIONAL_SUFFIXES = ("num_batches_tracked",)
# Wrappers around the weights in the official and common training-tool files.
_WRAPPER_KEYS = ("model", "state_dict", "module")
# What a checkpoint holds: parameters and BatchNorm statistics (not RNG state).
WEIGHTS = nnx.Any(nnx.Param, nnx.BatchStat)
MODEL_JSON = "model.json"
STATE_DIR = "state"


class CheckpointMismatchError(ValueError):
  """A state dict does not fit the module; the message lists every problem."""


class CheckpointReadError(ValueError):
  """A weights file or directory that cannot be read (truncated, corrupt, or not what its
  name says); the message names the file and the problem in one line."""


@dataclasses.dataclass
class LoadReport:
  """What ``load_state_dict`` did not load (empty lists after a strict load)."""

  missing: list[str]
  unexpected: list[str]
  mismatched: list[str]


@dataclasses.dataclass(frozen=True)
class _Slot:
  variable: nnx.Variable
  is_kernel: bool  # a flax kernel: transposed relative to PyTorch
  index: int | None = None  # the block, along a stacked variable's leading axis


def _official_path(root: nnx.Module, path: tuple[Any, ...]) -> str:
  """The official name of the variable at ``path`` (as ``nnx.iter_graph`` gives it),
  with "{}" where a stacked variable's block index goes."""
  parts: list[str] = []
  node: Any = root
  for name in path[:-1]:
    mapped = OFFICIAL_NAMES.get(type(node), {}).get(name)
    parts.append(mapped if mapped is not None else str(name))
    node = node[name] if isinstance(name, int) else getattr(node, name)
  leaf = path[-1]
  if type(node) not in OFFICIAL_NAMES:  # flax's own layers: kernel and scale are "weight"
    leaf = _FLAX_LEAVES.get(leaf, leaf)
  parts.append(str(leaf))
  return ".".join(parts)


def _named(module: nnx.Module, kinds
           ) -> Iterator[tuple[tuple[Any, ...], nnx.Variable, list[str], bool]]:
  """``(path, variable, official names, stacked)`` of the module's variables of
  ``kinds``: a stacked variable has one name per block along its leading axis."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, kinds):
      name = _official_path(module, path)
      stacked = "{}" in name
      yield path, node, ([name.format(j) for j in range(node.get_value().shape[0])]
                         if stacked else [name]), stacked


def official_names(module: nnx.Module) -> dict[tuple[Any, ...], list[str]]:
  """nnx path of every parameter -> its official names (one per block if stacked)."""
  return {path: names for path, _, names, _ in _named(module, nnx.Param)}


def _slots(module: nnx.Module) -> dict[str, _Slot]:
  """Official name -> the variable (and block) that holds it."""
  slots = {}
  for path, node, names, stacked in _named(module, (nnx.Param, nnx.BatchStat)):
    for j, name in enumerate(names):
      slots[name] = _Slot(node, path[-1] == "kernel", j if stacked else None)
  return slots


def state_dict_keys(module: nnx.Module) -> list[str]:
  """The official keys ``to_state_dict(module)`` would give (parameters and BatchNorm
  statistics), sorted; works on an abstract module from ``nnx.eval_shape``."""
  return sorted(_slots(module))


def _to_torch_layout(value: np.ndarray, is_kernel: bool) -> np.ndarray:
  if not is_kernel:
    return value
  if value.ndim == 4:  # conv [kh, kw, in, out] -> [out, in, kh, kw]
    return value.transpose(3, 2, 0, 1)
  return value.T  # linear [in, out] -> [out, in]


def _from_torch_layout(value: np.ndarray, is_kernel: bool) -> np.ndarray:
  if not is_kernel:
    return value
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  return value.T


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def normalize_state_dict(state_dict: Mapping[str, Any], expected: set[str] | None = None
                         ) -> dict[str, np.ndarray]:
  """Numpy arrays under official names.

  Strips a ``model.`` (Hugging Face) or ``module.`` (DDP) prefix carried by every key
  and renames the Hugging Face ``layer_scale1/2`` to ``gamma1/2``.
  """
  sd = {str(k): v for k, v in state_dict.items()}
  for prefix in ("module.", "model."):
    if sd and all(k.startswith(prefix) for k in sd) and not (
        expected and any(k in expected for k in sd)):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  renamed = {}
  for key, value in sd.items():
    for hf, official in ((".layer_scale1", ".gamma1"), (".layer_scale2", ".gamma2")):
      if key.endswith(hf):
        key = key[: -len(hf)] + official
    renamed[key] = _to_numpy(value)
  return renamed


def load_state_dict(module: nnx.Module, state_dict: Mapping[str, Any], strict: bool = True
                    ) -> LoadReport:
  """Copies an official-layout state dict into ``module`` in place.

  ``module`` is a whole ``InternImage``, a ``Segmentor`` (mmseg's ``backbone.*``,
  ``decode_head.*``, ``auxiliary_head.*``), or any submodule (e.g. one ``DCNv3`` or a
  decode head) with keys relative to it; a dict wrapping the weights as checkpoint files
  do (``{"state_dict": ..., "meta": ...}``, ``{"model": ...}``) is unwrapped. BatchNorm's
  ``num_batches_tracked`` may be absent. Strict (the default) raises
  :class:`CheckpointMismatchError` listing every missing, unexpected and shape-mismatched
  key; otherwise matching entries are loaded and the rest reported. Values are cast to
  each variable's dtype.
  """
  slots = _slots(module)
  sd = normalize_state_dict(_strip_wrappers(state_dict), set(slots))
  missing = sorted(k for k in slots if k not in sd and not k.endswith(_OPTIONAL_SUFFIXES))
  unexpected = sorted(k for k in sd if k not in slots)
  mismatched = []
  updates: dict[int, tuple[nnx.Variable, np.ndarray]] = {}  # id(variable) -> new value
  for key, slot in slots.items():
    if key not in sd:
      continue
    value = _from_torch_layout(sd[key], slot.is_kernel)
    shape = tuple(slot.variable.get_value().shape)
    want = shape if slot.index is None else shape[1:]
    if tuple(value.shape) != want:
      mismatched.append(
          f"{key}: checkpoint {tuple(sd[key].shape)} (as JAX {tuple(value.shape)}), model {want}")
      continue
    if slot.index is None:
      updates[id(slot.variable)] = (slot.variable, value)
    else:  # one block of a stacked variable: the others keep their values
      variable, stack = updates.get(id(slot.variable)) or (
          slot.variable, np.array(slot.variable.get_value()))
      stack[slot.index] = value
      updates[id(slot.variable)] = (variable, stack)
  if strict and (missing or unexpected or mismatched):
    lines = [f"state dict does not match {type(module).__name__}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected),
                        ("shape mismatch", mismatched)):
      if keys:
        lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
    raise CheckpointMismatchError("\n".join(lines))
  for variable, value in updates.values():
    variable.set_value(jnp.asarray(value, dtype=variable.get_value().dtype))
  return LoadReport(missing, unexpected, mismatched)


def to_state_dict(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's weights under official names, in PyTorch layout (numpy arrays)."""
  out = {}
  for key, slot in sorted(_slots(module).items()):
    value = np.asarray(slot.variable.get_value())
    if slot.index is not None:
      value = value[slot.index]
    # np.array(order="C"), unlike np.ascontiguousarray, keeps 0-d arrays 0-d.
    out[key] = np.array(_to_torch_layout(value, slot.is_kernel), order="C")
  return out


def _strip_wrappers(obj: Any) -> Any:
  """The weights inside ``{"model": ...}``, ``{"state_dict": ..., "meta": ...}`` (mmcv,
  mmseg) or ``{"module": ...}``; a plain state dict is returned as it is (its values are
  arrays, never dicts)."""
  while isinstance(obj, Mapping):
    wrapper = next((k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
    if wrapper is None:
      break
    obj = obj[wrapper]
  return obj


def _unwrap(obj: Any, use_ema: bool, path: Path) -> Mapping[str, Any]:
  if use_ema:
    if not (isinstance(obj, Mapping) and "model_ema" in obj):
      keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
      raise CheckpointMismatchError(f"{path}: use_ema=True but no 'model_ema' entry (has {keys})")
    obj = obj["model_ema"]
  obj = _strip_wrappers(obj)
  if not isinstance(obj, Mapping):
    raise CheckpointMismatchError(f"{path}: expected a dict of weights, found {type(obj).__name__}")
  return obj


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, np.ndarray]:
  """Reads an official-layout state dict from ``.pth``/``.bin``, ``.safetensors``, ``.npz``
  or a train.py run (its workdir: the newest checkpoint; or ``WORKDIR/checkpoints/N``).

  ``.pth``/``.bin`` need torch and are read with ``weights_only=True``; the weights
  are unwrapped from ``model``, ``state_dict`` or ``module`` (or ``model_ema`` with
  ``use_ema``).
  """
  path = Path(path)
  step = train_run_step(path) if path.is_dir() else None
  if step is not None:
    return _read_train_run(step, use_ema)
  if _is_orbax_dir(path):
    return _read_converted(path, use_ema)
  if path.is_dir():
    raise FileNotFoundError(f"{path} is a directory but not an orbax checkpoint from "
                            f"internimage_jax.convert (no '{STATE_DIR}/' inside) nor a "
                            "train.py workdir (no model.json and checkpoints/)")
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  suffix = path.suffix.lower()
  if suffix == ".safetensors":
    from safetensors.numpy import load_file
    if use_ema:
      raise CheckpointMismatchError(f"{path}: safetensors files hold one state dict; no EMA copy")
    try:
      tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
      raise CheckpointReadError(f"cannot read {path} as safetensors: {first_line(e)}") from None
    return normalize_state_dict(tensors)
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except Exception as e:  # noqa: BLE001 - a bad zip, pickled objects, a truncated member
      raise CheckpointReadError(f"cannot read {path} as an .npz archive of arrays "
                                f"({type(e).__name__})") from None
    return normalize_state_dict(_unwrap(arrays, use_ema, path))
  if suffix in (".pth", ".pt", ".bin", ".ckpt"):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
          f"reading {path.name} needs PyTorch: pip install 'internimage-jax[torch]' "
          "(or convert it to .safetensors elsewhere)") from e
    return normalize_state_dict(_unwrap(_torch_load(torch, path), use_ema, path))
  raise ValueError(
      f"unsupported checkpoint format {path.suffix!r} for {path}; use .pth/.bin, "
      ".safetensors, .npz or an orbax directory written by internimage_jax.convert")


def _torch_load(torch, path: Path) -> Any:
  """``torch.load`` with ``weights_only=True`` (a file can hold code; this reads only
  tensors and plain containers), its failures in one line."""
  import pickle
  import warnings

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. the pickle-protocol notice of plain pickles
      return torch.load(str(path), map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:
    why = ("it holds objects other than tensors and plain containers (a pickled model or "
           "optimizer?); save the model's state_dict() instead")
  except RuntimeError as e:
    why = "the file is truncated or damaged" if "zip archive" in str(e) else first_line(e)
  except Exception as e:  # noqa: BLE001 - torch's reader raises many types on garbage
    why = f"not a PyTorch checkpoint ({type(e).__name__})"
  raise CheckpointReadError(f"cannot read {path}: {why}")


def _is_orbax_dir(path: Path) -> bool:
  """A directory written by ``save_orbax`` (not a train.py checkpoint, which has a
  ``state/`` too)."""
  return path.is_dir() and (path / STATE_DIR).is_dir() and train_run_step(path) is None


def train_run_step(path: str | os.PathLike) -> Path | None:
  """The checkpoint of a train.py run that ``path`` names: its workdir (the newest
  step) or one step directory (``WORKDIR/checkpoints/N``); None for any other path."""
  path = Path(path)
  if (path / MODEL_JSON).is_file() and (path / "checkpoints").is_dir():
    # Orbax gives a step its number only once complete; damaged steps are moved away.
    steps = [int(p.name) for p in (path / "checkpoints").iterdir()
             if p.name.isdigit() and (p / STATE_DIR).is_dir()]
    if not steps:
      raise FileNotFoundError(f"train.py workdir {path} holds no complete checkpoint yet")
    return path / "checkpoints" / str(max(steps))
  if (path.name.isdigit() and path.parent.name == "checkpoints"
      and (path / STATE_DIR).is_dir() and (path.parents[1] / MODEL_JSON).is_file()):
    return path
  return None


def _read_train_run(step_dir: Path, use_ema: bool) -> dict[str, np.ndarray]:
  """The official-layout state dict of a train.py checkpoint: the model named by the
  run's ``model.json`` is built from shapes alone and only its parameters (``params``
  or ``ema_params``) and BatchNorm statistics are read, not the optimizer's state."""
  import orbax.checkpoint as ocp

  from internimage_jax.training.tasks import TASKS

  workdir = step_dir.parents[1]
  meta = read_model_json(workdir)
  try:
    task = TASKS[meta.get("task", "classification")]()
    model = nnx.eval_shape(lambda: task.create(meta["model"], meta["num_classes"],
                                               meta.get("options", {}), rngs=nnx.Rngs(0)))
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointReadError(f"{workdir / MODEL_JSON} does not describe a model: "
                              f"{first_line(e)}") from None
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  host = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  shapes = lambda tree: jax.tree.map(  # noqa: E731
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=host), tree)
  key = "ema_params" if use_ema else "params"
  try:
    with ocp.PyTreeCheckpointer() as reader:
      stored = reader.metadata(step_dir / STATE_DIR).item_metadata
      if use_ema and key not in (stored.tree if hasattr(stored, "tree") else stored):
        raise CheckpointMismatchError(f"{step_dir}: the run kept no EMA weights "
                                      "(train.ema_decay was 0)")
      item = {key: shapes(params), "batch_stats": shapes(stats)}
      restored = reader.restore(step_dir / STATE_DIR, args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
  except CheckpointMismatchError:
    raise
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many types
    raise CheckpointReadError(f"cannot read train.py checkpoint {step_dir}: {describe(e)}"
                              ) from None
  return to_state_dict(nnx.merge(graphdef, restored[key], restored["batch_stats"], rest))


def _read_converted(directory: Path, use_ema: bool) -> dict[str, np.ndarray]:
  """The state dict of a ``save_orbax`` directory, through the model its ``model.json``
  names (built from shapes)."""
  from internimage_jax import models

  if use_ema:
    raise CheckpointMismatchError(f"{directory}: converted checkpoints hold one set of "
                                  "weights; convert with --use-ema to get the EMA weights")
  meta = read_model_json(directory)
  try:
    name, options = meta["model"], meta.get("options", {})
    if name.startswith("upernet_"):
      build = lambda: models.create_segmentor(  # noqa: E731
          name, num_classes=meta.get("num_classes", 150), rngs=nnx.Rngs(0), **options)
    elif name.startswith("mask_rcnn_"):
      build = lambda: models.create_detector(  # noqa: E731
          name, num_classes=meta.get("num_classes", 80), rngs=nnx.Rngs(0), **options)
    else:
      build = lambda: models.create(  # noqa: E731
          name, num_classes=meta.get("num_classes"), rngs=nnx.Rngs(0), **options)
    model = nnx.eval_shape(build)
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointReadError(f"{directory}: no {MODEL_JSON} that describes its model "
                              f"({first_line(e)}); load it with load_checkpoint into a "
                              "model built with its options") from None
  _load_orbax(model, directory)
  return to_state_dict(model)


def save_orbax(module: nnx.Module, directory: str | os.PathLike,
               metadata: Mapping[str, Any] | None = None, overwrite: bool = False) -> Path:
  """Writes the module's parameters and statistics as an orbax checkpoint directory.

  ``metadata`` (model name and options) goes to ``model.json`` beside it, so that
  ``predict`` can rebuild the model. The state is written by orbax, which commits it
  atomically: an interrupted save never leaves a directory that looks complete. An
  existing checkpoint is replaced only with ``overwrite``, and only once the new one
  is complete.
  """
  import orbax.checkpoint as ocp

  directory = Path(directory).absolute()
  if (directory / STATE_DIR).exists() and not overwrite:
    raise FileExistsError(f"{directory} holds a checkpoint; choose a new output directory "
                          "or pass --overwrite")
  staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  staging.mkdir(parents=True)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(staging / STATE_DIR, nnx.state(module, WEIGHTS))
    if metadata is not None:
      (staging / MODEL_JSON).write_text(json.dumps(dict(metadata), indent=1, sort_keys=True))
    directory.mkdir(parents=True, exist_ok=True)
    for name in (STATE_DIR, MODEL_JSON):
      # The old entry moves into the staging folder (deleted below), then the new one
      # takes its place: at no moment is neither of them on disk.
      target = directory / name
      if target.exists():
        os.replace(target, staging / f"{name}.replaced")
      if (staging / name).exists():
        os.replace(staging / name, target)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory


def read_model_json(directory: str | os.PathLike) -> dict[str, Any]:
  """The ``model.json`` of a converted directory or a train.py workdir (or of the workdir
  of a train.py step directory); ``{}`` if there is none."""
  directory = Path(directory)
  step = train_run_step(directory) if directory.is_dir() else None
  path = (step.parents[1] if step is not None else directory) / MODEL_JSON
  return json.loads(path.read_text()) if path.is_file() else {}


def write_model_json(directory: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
  """Writes ``metadata`` as ``directory/model.json``, whole or not at all."""
  path = Path(directory) / MODEL_JSON
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(dict(metadata), indent=1, sort_keys=True))
  os.replace(tmp, path)
  return path


def _load_orbax(module: nnx.Module, directory: Path) -> None:
  import orbax.checkpoint as ocp

  from internimage_jax.training.checkpoints import (OldLayoutCheckpoint, UnreadableCheckpoint,
                                                    shapes_of, stored_shapes)

  target = nnx.state(module, WEIGHTS)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
  state_dir = directory.absolute() / STATE_DIR
  try:
    stored = stored_shapes(state_dir)
  except UnreadableCheckpoint as e:
    raise CheckpointReadError(f"cannot read orbax checkpoint {directory}: {e}") from None
  except OldLayoutCheckpoint as e:
    raise CheckpointMismatchError(
        f"orbax checkpoint {directory}: {e}; convert the official weights again (python -m "
        "internimage_jax.convert), or export it to .safetensors with the version that wrote "
        "it and convert that") from None
  if stored != shapes_of(abstract):
    raise CheckpointMismatchError(
        f"orbax checkpoint {directory} does not match {type(module).__name__}: other "
        "parameter names or shapes (another variant, or other options in model.json?)")
  with ocp.StandardCheckpointer() as ckptr:
    try:
      restored = ckptr.restore(state_dir, abstract)
    except Exception as e:  # noqa: BLE001 - the metadata fits: the data files are damaged
      raise CheckpointReadError(
          f"cannot read orbax checkpoint {directory}: its data is damaged ({describe(e)})"
      ) from None
  nnx.update(module, restored)


def load_checkpoint(module: nnx.Module, path: str | os.PathLike, use_ema: bool = False,
                    strict: bool = True) -> LoadReport:
  """Loads weights into ``module`` in place from any supported file or orbax directory."""
  path = Path(path)
  if _is_orbax_dir(path):
    if use_ema:
      raise CheckpointMismatchError(f"{path}: converted checkpoints hold one set of weights; "
                                    "convert with --use-ema to get the EMA weights")
    _load_orbax(module, path)
    return LoadReport([], [], [])
  return load_state_dict(module, read_state_dict(path, use_ema=use_ema), strict=strict)


def save_safetensors(module: nnx.Module, path: str | os.PathLike) -> Path:
  """Writes ``to_state_dict(module)`` as ``.safetensors`` (readable by PyTorch users)."""
  from safetensors.numpy import save_file

  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  save_file(to_state_dict(module), str(tmp))
  os.replace(tmp, path)  # never leave a half-written file under the final name
  return path


def _parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m internimage_jax.convert",
      description="Convert official InternImage weights to an orbax checkpoint, or back to "
                  "an official-layout .safetensors file.")
  parser.add_argument("--model", required=True, help="variant, e.g. internimage_t")
  parser.add_argument("--checkpoint", required=True,
                      help=".pth/.bin/.safetensors/.npz file, or an orbax directory")
  parser.add_argument("--out", required=True,
                      help="output orbax directory, or a .safetensors file for the reverse")
  parser.add_argument("--num-classes", type=int, default=None,
                      help="classes of the head (default: read from the checkpoint)")
  parser.add_argument("--use-ema", action="store_true", help="take the 'model_ema' weights")
  parser.add_argument("--options", default="{}",
                      help="JSON overrides of the variant's constructor options")
  parser.add_argument("--overwrite", action="store_true",
                      help="replace an existing output (only once the new one is complete)")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  from internimage_jax.models import create, variants

  args = _parse_args(sys.argv[1:] if argv is None else argv)
  try:
    options = json.loads(args.options)
    if not isinstance(options, dict):
      raise ValueError("--options must be a JSON object")
    variants.variant_options(args.model)  # a clear error for an unknown name
    out = Path(args.out)
    existing = out if out.suffix == ".safetensors" else out / STATE_DIR
    if existing.exists() and not args.overwrite:  # before the (slow) reading
      raise FileExistsError(f"{out} exists; choose another output or pass --overwrite")
    source = Path(args.checkpoint)
    metadata = read_model_json(source) if source.is_dir() else {}
    state_dict = None if _is_orbax_dir(source) else read_state_dict(source, use_ema=args.use_ema)
    num_classes = args.num_classes
    if num_classes is None:
      num_classes = metadata.get("num_classes")
    if num_classes is None and state_dict is not None and "head.weight" in state_dict:
      num_classes = int(state_dict["head.weight"].shape[0])
    num_classes = 1000 if num_classes is None else num_classes
    options = {**metadata.get("options", {}), **options}
    model = create(args.model, num_classes=num_classes, **options)
    if state_dict is None:
      load_checkpoint(model, source)
    else:
      load_state_dict(model, state_dict)
    if out.suffix == ".safetensors":
      save_safetensors(model, out)
    else:
      save_orbax(model, out, {"model": args.model, "num_classes": num_classes, "options": options},
                 overwrite=args.overwrite)
  except (OSError, ValueError, ImportError, TypeError) as e:  # TypeError: an unknown option
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out} ({args.model}, {num_classes} classes)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
