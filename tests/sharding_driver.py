"""Runs the DCNv3 operator and a train step over 8 fake CPU devices; prints one JSON line.

Started by tests/test_dcnv3_sharding.py in a process of its own (the device count is
fixed when jax starts). ``python tests/sharding_driver.py op|model|train``.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")

import functools  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from internimage_jax import ops  # noqa: E402

COLLECTIVE = re.compile(
    r"= (\([^=]*\)|\S+) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)"
    r"(?:-start)?\(")
AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def collectives(compiled_text: str) -> list[tuple[str, str]]:
  """``(kind, result shape)`` of every collective in a compiled HLO module."""
  return [(kind, shape) for shape, kind in COLLECTIVE.findall(compiled_text)]


def _x64(enabled: bool):
  enable = getattr(jax, "enable_x64", None)
  if enable is None:  # older spelling
    from jax.experimental import enable_x64 as enable
  return enable(enabled)


def _inputs(n=8, size=6, channels=32, group=4, points=9, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, size, size, channels)).astype(dtype),
          (1.5 * rng.standard_normal((n, size, size, group * points * 2))).astype(dtype),
          rng.random((n, size, size, group * points)).astype(dtype),
          rng.standard_normal((n, size, size, channels)).astype(dtype))


def _fwd_bwd(impl: str, group: int):
  def run(x, offset, mask, grad_out):
    out, vjp = jax.vjp(functools.partial(ops.dcnv3, group=group, implementation=impl),
                       x, offset, mask)
    return out, *vjp(grad_out)
  return jax.jit(run)


def _errors(got, want) -> list[float]:
  """max |got - want| / max |want| of each output."""
  return [float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
                / max(float(np.max(np.abs(np.asarray(b, np.float64)))), 1e-30))
          for a, b in zip(got, want)]


def op_cases() -> dict:
  """The operator under both axis types, batch- and group-split, float32 and float64."""
  out = {}
  for dtype in (np.float32, np.float64):
    with _x64(dtype == np.float64):
      arrays = _inputs(dtype=dtype)
      want = _fwd_bwd("xla", 4)(*arrays)  # one device: no mesh anywhere
      for name, kind in AXIS_TYPES.items():
        for axes, spec in ((("data", "fsdp"), P(("data", "fsdp"))),
                           (("data", "model"), P("data", None, None, "model"))):
          mesh = jax.make_mesh((2, 4), axes, axis_types=(kind,) * 2)
          if spec[-1] == "model" and kind == AxisType.Auto:
            continue  # groups are read from the operands' types (Explicit axes) only
          with jax.set_mesh(mesh):
            placed = [jax.device_put(a, NamedSharding(mesh, spec)) for a in arrays]
            for impl in ("pallas", "xla"):
              fn = _fwd_bwd(impl, 4)
              got = fn(*placed)
              key = f"{np.dtype(dtype).name}/{name}/{'x'.join(axes)}/{impl}"
              out[key] = {
                  "errors": _errors(got, want),
                  "collectives": collectives(fn.lower(*placed).compile().as_text()),
                  "out_specs": [str(g.sharding.spec) for g in got],
              }
  # Height split: an error that names the axis.
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    placed = [jax.device_put(a, NamedSharding(mesh, P("data", "fsdp"))) for a in _inputs(size=8)]
    try:
      _fwd_bwd("pallas", 4)(*placed)
      out["height_split_error"] = None
    except ValueError as e:
      out["height_split_error"] = str(e)
  return out


def model_case() -> dict:
  """A small InternImage's forward and gradients under Explicit axes against one
  device's (the fallback: the operator's per-device path is the same for both
  implementations, and the kernels' is checked above)."""
  from flax import nnx

  from internimage_jax import models

  options = dict(num_classes=10, channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
  x = np.random.default_rng(1).standard_normal((8, 32, 32, 3)).astype(np.float32)

  def loss_and_grads(implementation: str, x):
    model = models.create("internimage_t", implementation=implementation, rngs=nnx.Rngs(0),
                          **options)

    @nnx.jit
    def run(model, x):
      return nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)

    loss, grads = run(model, x)
    return float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)]

  want_loss, want = loss_and_grads("xla", x)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
  with jax.set_mesh(mesh):
    loss, got = loss_and_grads("xla", jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))
  return {"loss": loss, "want_loss": want_loss, "max_grad_error": max(_errors(got, want))}


def train_case() -> dict:
  """One train step of the quickstart on mesh data 2 x fsdp 4 with each implementation:
  loss, updated parameters and the collectives of the compiled step."""
  from internimage_jax.training.trainer import TrainProgram

  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  quickstart = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(quickstart)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (64,), dtype=np.int32)
  out, grads, initial = {}, {}, None
  for impl in ("pallas", "xla"):
    cfg = quickstart.get_config()
    cfg.mesh.update(data=2, fsdp=4)
    cfg.model.implementation = impl
    program = TrainProgram(cfg, num_classes=10, steps_per_epoch=20)
    compiled = program.train_step.lower(*program.abstract_inputs()).compile()
    # One initial state for both (the implementation is not part of it); the step
    # donates its state, so each step gets a copy.
    initial = initial or program.init()
    state, rng_state = jax.tree.map(jnp.copy, initial)
    batch = {"image": images, "label": labels}
    state, metrics = compiled(state, rng_state, jax.device_put(batch, program.batch_sharding))
    # AdamW's first moment after one step is 0.1 x the (clipped) gradient.
    moments = [a for path, a in jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
               if "mu" in jax.tree_util.keystr(path)]
    grads[impl] = [np.asarray(a) for a in moments]
    # The operator's operands and gradients at each level, per device and whole.
    levels = [(32 // 4 >> i, 16 << i, g) for i, g in enumerate((1, 2, 4, 8))]
    operand_shapes = sorted({f"{n},{s},{s},{c}" for s, ch, g in levels for n in (8, 64)
                             for c in (ch, g * 18, g * 9)})
    out[impl] = {"loss": float(metrics["loss"]), "collectives": collectives(compiled.as_text()),
                 "operand_shapes": operand_shapes}
  out["max_grad_error"] = max(_errors(grads["pallas"], grads["xla"]))
  out["gradient_arrays"] = len(grads["xla"])
  return out


if __name__ == "__main__":
  case = {"op": op_cases, "model": model_case, "train": train_case}[sys.argv[1]]
  print(json.dumps(case()))
