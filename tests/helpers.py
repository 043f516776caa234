"""Shared test helpers: golden files, precision contexts and tolerances."""

from __future__ import annotations

import contextlib
import getpass
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

# ../shared/golden beside the checkout; INTERNIMAGE_GOLDEN_DIR points elsewhere (e.g. a
# copy carried to a machine where the checkout has no ../shared).
GOLDEN_DIR = Path(os.environ.get("INTERNIMAGE_GOLDEN_DIR") or (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "golden")).resolve()

# ../shared/golden/README.md: compare arrays whole, max|got - want| <= tol * max|want|.
# The spec's parameter counts (1000 classes); checked in test_recipes on the abstract
# state of every official config.
PARAM_COUNTS = {
    "internimage_t": 29_918_424, "internimage_s": 50_079_880, "internimage_b": 97_461_832,
    "internimage_l": 223_334_810, "internimage_xl": 334_819_780,
    "internimage_h": 1_089_636_760, "internimage_g": 3_076_373_352,
}

# Small networks of the golden files' shapes: mini T (model_mini_t) and every H/G option
# (model_mini_h; the clip head needs inputs that are multiples of 32).
MINI_T = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8))
MINI_H = dict(channels=16, depths=(1, 1, 6, 1), groups=(2, 4, 8, 16), dw_kernel_size=5,
              res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(2, 5),
              center_feature_scale=True, use_clip_projector=True)

TOL_X64 = 1e-5
TOL_OP_F32 = 1e-4
TOL_NET_F32 = 2e-4


def golden_tol(dtype, *, network: bool = False) -> float:
  if np.dtype(dtype) == np.float64:
    return TOL_X64
  return TOL_NET_F32 if network else TOL_OP_F32


def require_golden() -> Path:
  """The golden directory; skips (or fails under CI=true) when it is absent."""
  if not (GOLDEN_DIR / "index.json").is_file():
    message = f"golden vectors not found at {GOLDEN_DIR} (clone beside ../shared)"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)
  return GOLDEN_DIR


def require_module(name: str, install: str):
  """``import name``; skips (or fails under CI=true, which installs it) when it is absent."""
  try:
    return importlib.import_module(name)
  except ImportError as e:
    message = f"{name} is not installed ({e}); {install}"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(message)
    pytest.skip(message)


def golden_index(name: str = "index.json") -> dict:
  return json.loads((require_golden() / name).read_text())


def golden_cases(kind: str, index: str = "index.json") -> list[str]:
  """Case names of one kind, for parametrize (empty when the goldens are absent)."""
  path = GOLDEN_DIR / index
  if not path.is_file():
    return ["<golden missing>"]
  return sorted(k for k, v in json.loads(path.read_text()).items() if v["kind"] == kind)


def load_golden(name: str) -> dict[str, np.ndarray]:
  with np.load(require_golden() / f"{name}.npz") as data:
    return {k: data[k] for k in data.files}


def params_of(golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}


@contextlib.contextmanager
def precision(dtype):
  """Enables x64 for the block when ``dtype`` is float64."""
  if np.dtype(dtype) != np.float64:
    yield
    return
  enable = getattr(jax, "enable_x64", None)
  if enable is None:  # older spelling
    from jax.experimental import enable_x64 as enable  # type: ignore[no-redef]
  with enable(True):
    yield


def assert_rel_close(got, want, tol: float, name: str = "") -> None:
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  scale = float(np.max(np.abs(want)))
  err = float(np.max(np.abs(got - want)))
  assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol:g} * max|want| ({scale:.3g})"


# ------------------------------------------------------------- the main job, as users run it
REPO = Path(__file__).resolve().parents[1]
QUICKSTART = ["train.py", "--config", "configs/quickstart.py"]
SEG_QUICKSTART = ["train.py", "--config", "configs/segmentation_quickstart.py"]
# Its backbone from random weights: no classification run to depend on.
SEG_SCRATCH = ["train.py", "--config", "configs/segmentation_quickstart.py:scratch"]
DET_QUICKSTART = ["train.py", "--config", "configs/detection_quickstart.py"]
DET_SCRATCH = ["train.py", "--config", "configs/detection_quickstart.py:scratch"]


# The train.py runs of the tests compile the same few programs again and again: JAX's
# persistent compilation cache, shared by the test workers, takes a quickstart run from
# ~40 s to ~15 s on two cores. Only these subprocesses use it (the in-process tests read
# compiled HLO text, which a cached executable need not carry).
COMPILATION_CACHE = Path(tempfile.gettempdir()) / f"internimage-jax-tests-{getpass.getuser()}"


# Cross-process collectives on a loaded machine: wait as a real cluster would.
COLLECTIVE_PATIENCE = ("--xla_cpu_collective_call_terminate_timeout_seconds=600 "
                       "--xla_cpu_collective_call_warn_stuck_timeout_seconds=120")


# Quick codegen (a quarter off a quickstart run on two cores): these runs check
# behaviour, and every run they compare with is built the same way.
QUICK_CODEGEN = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def train_env(devices: int = 1, xla_flags: str = "", cache: bool = True,
              quick_codegen: bool = True) -> dict[str, str]:
  """The environment of a ``train.py`` subprocess with ``devices`` fake CPU devices.
  ``cache=False`` for a process whose writes may fail (it would leave a cut entry);
  ``quick_codegen=False`` for a run long enough that slower code costs more than the
  compile time saved (hundreds of steps)."""
  codegen = QUICK_CODEGEN if quick_codegen else ""
  flags = f"--xla_force_host_platform_device_count={devices} {codegen} {xla_flags}"
  env = dict(os.environ, XLA_FLAGS=" ".join(flags.split()))
  if cache:
    env["JAX_COMPILATION_CACHE_DIR"] = str(COMPILATION_CACHE)
  return env


def run_quickstart(workdir, *overrides, devices: int = 1, check: bool = True,
                   cache: bool = True, quick_codegen: bool = True, command=QUICKSTART,
                   **kwargs):
  """``python train.py --config configs/quickstart.py --workdir WORKDIR OVERRIDES...``
  (``command``: another ``train.py --config ...``)."""
  proc = subprocess.run([sys.executable, *command, "--workdir", str(workdir), *overrides],
                        cwd=REPO, env=train_env(devices, cache=cache, quick_codegen=quick_codegen),
                        capture_output=True, text=True, check=False, **kwargs)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def metrics_rows(workdir) -> list[dict]:
  return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(workdir) -> dict[int, float]:
  """Training loss per step; a resumed run's later lines win."""
  return {m["step"]: m["train/loss"] for m in metrics_rows(workdir) if "train/loss" in m}


# ------------------------------------ DCNv3: the backends' suite (test_dcnv3_backends) and sharding
TRITON_CALL = "__gpu$xla.gpu.triton"
# Lowering a Triton kernel asks for the target GPU; without one attached (CI), newer
# JAX reads it from the abstract mesh's device. An H100, the card we benchmark on.
CUDA_DEVICE = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                          platform="gpu")


def dcnv3_golden_kwargs(entry: dict) -> dict:
  """``ops.dcnv3`` keyword arguments of a ``dcnv3_core`` golden's index entry."""
  return dict(
      kernel_size=(entry["kernel_h"], entry["kernel_w"]),
      stride=(entry["stride_h"], entry["stride_w"]),
      pad=(entry["pad_h"], entry["pad_w"]),
      dilation=(entry["dilation_h"], entry["dilation_w"]),
      group=entry["group"],
      offset_scale=entry["offset_scale"],
      remove_center=bool(entry["remove_center"]),
  )


def dcnv3_random_operands(shape, channels, group, points, out_hw, seed=0, offset_std=2.0):
  """Random float32 ``(x, offset, mask, grad_out)`` for ``shape = (n, h, w)``."""
  n, h, w = shape
  ho, wo = out_hw
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((n, h, w, channels)).astype(np.float32),
          (offset_std * rng.standard_normal((n, ho, wo, group * points * 2))).astype(np.float32),
          rng.random((n, ho, wo, group * points)).astype(np.float32),
          rng.standard_normal((n, ho, wo, channels)).astype(np.float32))


def assert_dcnv3_matches_fallback(op, kwargs: dict, x, offset, mask, grad_out) -> None:
  """``op(x, offset, mask)`` and its three gradients equal the XLA fallback's."""
  import functools

  from internimage_jax import ops

  out, vjp = jax.vjp(op, x, offset, mask)
  want_out, want_vjp = jax.vjp(functools.partial(ops.dcnv3, implementation="xla", **kwargs),
                               x, offset, mask)
  for name, got, want in zip(("out", "grad_x", "grad_offset", "grad_mask"),
                             (out, *vjp(grad_out)), (want_out, *want_vjp(grad_out))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
