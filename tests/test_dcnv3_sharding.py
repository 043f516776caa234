"""The DCNv3 operator on a device mesh (8 fake CPU devices): per device inside
``shard_map`` under Explicit and Auto axes, with no collective on its operands or
gradients; the same in a sharded train step; lowering of the sharded operator for
CUDA with the Triton kernels inside."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from helpers import CUDA_DEVICE, QUICK_CODEGEN, TOL_OP_F32, TOL_X64, TRITON_CALL
from internimage_jax import ops

REPO = Path(__file__).resolve().parents[1]


def _driver(case: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=QUICK_CODEGEN)
  proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_driver.py"), case],
                        cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _dims(shape_text: str) -> list[str]:
  """The dimension lists in an HLO shape: ``(f32[8,6,6,32]{...}, f32[])`` ->
  ``["8,6,6,32", ""]``."""
  return re.findall(r"\[([\d,]*)\]", shape_text)


def test_operator_splits_by_batch_and_group_with_no_collective():
  """Mesh data 2 x fsdp 4 set with jax.set_mesh, operands split over both axes, under
  Explicit and Auto axes, float32 and float64, kernels (interpret mode) and fallback:
  the jitted forward+backward equals one device's fallback, keeps every output split
  the same way, and compiles to a program without any collective. The same for
  channels split by whole groups over a mesh axis (Explicit axes); a height split is
  an error that names the axis. (One process runs every case: a module fixture would
  run once per xdist worker.)"""
  results = _driver("op")
  cases = [(f"{dtype}/{axis_types}/dataxfsdp/{impl}", "'data', 'fsdp'")
           for dtype in ("float32", "float64") for axis_types in ("explicit", "auto")
           for impl in ("pallas", "xla")]
  cases += [(f"{dtype}/explicit/dataxmodel/{impl}", "'model'")
            for dtype in ("float32", "float64") for impl in ("pallas", "xla")]
  for key, axes in cases:
    r = results[key]
    tol = TOL_X64 if key.startswith("float64") else TOL_OP_F32
    assert max(r["errors"]) <= tol, (key, r["errors"])  # out, grad_x, grad_offset, grad_mask
    assert r["collectives"] == [], (key, r["collectives"])
    assert all(axes in spec for spec in r["out_specs"]), (key, r["out_specs"])
  message = results["height_split_error"]
  assert message and "'fsdp'" in message and "height" in message


@pytest.mark.slow
def test_model_under_explicit_axes_matches_one_device():
  """A small InternImage's loss and gradients under Explicit axes equal one device's
  (slow: the operator's Explicit path runs in the default run above; this adds the
  rest of the model under sharding in types)."""
  r = _driver("model")
  assert r["loss"] == pytest.approx(r["want_loss"], rel=1e-5)
  assert r["max_grad_error"] <= TOL_OP_F32


def test_sharded_train_step_with_kernels_keeps_the_operator_local():
  """One quickstart train step on mesh data 2 x fsdp 4 with the Pallas kernels
  (interpret mode): the loss and gradients of the fallback's step, and the same
  collectives (parameter gathers and gradient reductions), none of them on an array
  shaped like the operator's operands or gradients, whole or per device."""
  r = _driver("train")
  pallas, xla = r["pallas"], r["xla"]
  assert pallas["loss"] == pytest.approx(xla["loss"], rel=1e-6)
  assert r["gradient_arrays"] > 50 and r["max_grad_error"] <= TOL_OP_F32
  assert sorted(map(tuple, pallas["collectives"])) == sorted(map(tuple, xla["collectives"]))
  operands = set(pallas["operand_shapes"])
  touched = [(kind, shape) for kind, shape in pallas["collectives"]
             if operands & set(_dims(shape))]
  assert pallas["collectives"] and not touched, touched


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_operator_exports_for_cuda_with_the_kernels(axis_type):
  """jax.export of the batch-split operator and its gradient for 8 GPUs (from this CPU
  host): both Triton kernels inside the per-device computation."""
  mesh = jax.sharding.AbstractMesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2,
                                   abstract_device=CUDA_DEVICE)
  split = NamedSharding(mesh, P(("data", "fsdp")))
  shapes = [(16, 14, 14, 64), (16, 14, 14, 4 * 18), (16, 14, 14, 4 * 9), (16, 14, 14, 64)]
  args = [jax.ShapeDtypeStruct(s, jnp.float32, sharding=split) for s in shapes]
  op = functools.partial(ops.dcnv3, group=4, implementation="pallas_triton")

  def fwd_bwd(x, offset, mask, grad_out):
    out, vjp = jax.vjp(op, x, offset, mask)
    return out, *vjp(grad_out)

  with jax.sharding.use_abstract_mesh(mesh):
    exported = export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*args)
  text = exported.mlir_module()
  assert exported.nr_devices == 8
  assert "sdy.manual_computation" in text  # the per-device region
  assert text.count(f"@{TRITON_CALL}") == 2  # the forward and the backward kernel
  assert "dcnv3_forward" in text and "dcnv3_backward" in text
  assert not re.search(r"all_gather|all_reduce|reduce_scatter|all_to_all", text)
