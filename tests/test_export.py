"""Serving export: StableHLO (jax.export) and ONNX (jax2onnx, DCNv3 as GridSample) round
trips equal the module, with a symbolic batch; the command line as a user runs it; its
errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import MINI_T, REPO, assert_rel_close, precision, require_golden, require_module
from internimage_jax import export, models
from internimage_jax.export import onnx as onnx_export
from internimage_jax.training.batch_augment import normalize
from pallas_kernels.dcnv3 import dcnv3


def _images(batch: int, size: int = 64) -> np.ndarray:
  return np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), np.uint8)


def test_stablehlo_round_trip_with_a_symbolic_batch(tmp_path):
  model = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(3),
                        implementation="xla", **MINI_T)  # lowers for every platform
  exported = export.to_stablehlo(model, image_size=64, batch=None,
                                 platforms=("cpu", "cuda", "tpu"))
  assert exported.platforms == ("cpu", "cuda", "tpu")
  assert str(exported.in_avals[0].shape[0]) == "batch"
  out = export.save(exported, tmp_path / "served", {"model": "internimage_t"})
  serve = export.load(out)  # JAX alone: no model code is called from here on
  for batch in (1, 3):
    images = _images(batch)
    want = model(normalize(jnp.asarray(images)))
    got = serve(jnp.asarray(images))
    assert got.shape == (batch, 10) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def _export(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "internimage_jax.export", *args], cwd=REPO,
                        capture_output=True, text=True, check=False)


def test_export_command_line_and_its_errors(tmp_path, capsys):
  pth = str(require_golden() / "model_mini_t.pth")
  options = json.dumps(dict(MINI_T))
  out = tmp_path / "mini"
  result = _export("--model", "internimage_t", "--checkpoint", pth, "--out", str(out),
                   "--options", options, "--batch", "2", "--image-size", "64",
                   "--platforms", "cpu")
  assert result.returncode == 0, result.stderr
  assert "wrote" in result.stdout and "10 classes" in result.stdout
  metadata = json.loads((out / export.METADATA).read_text())
  assert metadata["batch"] == "2" and metadata["image_size"] == 64
  model = models.create("internimage_t", pretrained=pth, **MINI_T)
  model.eval()
  images = _images(2)
  want = model(normalize(jnp.asarray(images)))
  np.testing.assert_allclose(export.load(out)(jnp.asarray(images)), want, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(want).max()))

  for args, message in (
      (["--format", "tflite"], "--format must be one of ('stablehlo', 'onnx'), got 'tflite'"),
      (["--format", "onnx", "--dtype", "bfloat16"], "--format onnx exports float32"),
      (["--format", "onnx", "--platforms", "cpu"], "--platforms is for --format stablehlo"),
      (["--batch", "0"], "batch must be a positive integer or 'dynamic', got '0'"),
      (["--batch", "two"], "batch must be a positive integer or 'dynamic', got 'two'"),
      (["--dtype", "float16"], "--dtype must be one of ['bfloat16', 'float32']"),
      (["--platforms", "cpu,rocm"], "platforms must be among ('cpu', 'cuda', 'tpu')"),
      (["--image-size", "65"], "image_size must be a positive multiple of 32, got 65"),
      (["--options", json.dumps(dict(MINI_T, channels=32, groups=(2, 4, 8, 16)))],
       "does not fit InternImage"),
      (["--num-classes", "5"], "newly initialised: head.bias, head.weight: an exported "
                               "classifier must be trained"),
      (["--options", json.dumps(dict(MINI_T, features_only=True))],
       "a features_only backbone has no logits to serve"),
      (["--options", json.dumps(dict(MINI_T, implementation="auto"))],
       "choose DCNv3's implementation with --implementation"),
      (["--image-size", "0"], "image_size must be a positive multiple of 32, got 0"),
      (["--implementation", "triton"], "--implementation must be xla or pallas"),
      (["--implementation", "pallas"], "with the kernels for one platform (cuda)"),
      (["--implementation", "pallas", "--platforms", "tpu"], "--platforms cuda"),
      (["--implementation", "pallas", "--platforms", "cuda", "--batch", "dynamic"],
       "the Pallas kernels need a fixed batch"),
  ):
    base = {"--options": options, "--image-size": "64", "--platforms": "cpu"}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for pair in base.items() for x in pair]
    code = export.main(["--model", "internimage_t", "--checkpoint", pth, "--out",
                        str(tmp_path / "bad"), *flat])
    err = capsys.readouterr().err
    assert code == 1 and message in err, (args, err)
    assert err.count("\n") == 1 and "Traceback" not in err


def test_stablehlo_export_with_the_triton_kernels_inside(tmp_path):
  """``--implementation pallas``: a cuda program whose DCNv3 layers are the Triton
  kernels (custom calls), exported from this CPU host."""
  from pallas_kernels.dcnv3 import api

  module, why = api.triton_kernels()
  if module is None:
    pytest.skip(f"this jax has no Pallas Triton backend ({why})")
  platform, call = "cuda", export.stablehlo.TRITON_CALL
  pth = str(require_golden() / "model_mini_t.pth")
  out = tmp_path / platform
  code = export.main(["--model", "internimage_t", "--checkpoint", pth, "--out", str(out),
                      "--options", json.dumps(dict(MINI_T)), "--implementation", "pallas",
                      "--platforms", platform, "--batch", "2", "--image-size", "64"])
  assert code == 0
  program = jax.export.deserialize(bytearray((out / "model.stablehlo").read_bytes()))
  text = program.mlir_module()
  assert program.platforms == (platform,)
  assert text.count(call) >= 4 and "dcnv3_forward" in text  # one per level's scanned block
  assert json.loads((out / export.METADATA).read_text())["implementation"] == "pallas_triton"


def test_exports_refuse_a_model_not_built_with_the_fallback(tmp_path):
  model = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(3),
                        implementation="auto", **MINI_T)
  with pytest.raises(ValueError, match="needs DCNv3 built with implementation='xla'"):
    export.to_stablehlo(model, image_size=64)
  with pytest.raises(ValueError, match="needs DCNv3 built with implementation='xla'"):
    export.to_onnx(model, tmp_path / "model.onnx", image_size=64)


def _onnxruntime():
  require_module("jax2onnx", f"ONNX export: {onnx_export.INSTALL}")
  return require_module("onnxruntime", f"ONNX export: {onnx_export.INSTALL}")


# (kernel, stride, pad, dilation, offset_scale, remove_center): the model's layers, then
# the operator's other options.
DCNV3_CASES = [(3, 1, 1, 1, 1.0, False), (3, 2, 0, 2, 0.5, True), (5, 1, 2, 1, 2.0, False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dcnv3_converts_to_grid_sample_and_matches_the_fallback(tmp_path, dtype):
  ort = _onnxruntime()
  import onnx

  rng = np.random.default_rng(0)
  n, h, w, g, c = 2, 9, 11, 2, 3
  for case, (k, stride, pad, dilation, scale, remove_center) in enumerate(DCNV3_CASES):
    def op(x, offset, mask):
      return dcnv3(x, offset, mask, kernel_size=k, stride=stride, pad=pad, dilation=dilation,
                   group=g, offset_scale=scale, remove_center=remove_center,
                   implementation="xla")
    p = k * k - int(remove_center)
    ho = (h + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    wo = (w + 2 * pad - (dilation * (k - 1) + 1)) // stride + 1
    x = rng.normal(size=(n, h, w, g * c)).astype(dtype)
    # Offsets of several pixels: points inside, across the border and far outside.
    offset = (4 * rng.normal(size=(n, ho, wo, g * p * 2))).astype(dtype)
    mask = rng.random((n, ho, wo, g * p)).astype(dtype)
    with precision(dtype):
      want = np.asarray(op(x, offset, mask))
      specs = [jax.ShapeDtypeStruct(("batch", *a.shape[1:]), a.dtype) for a in (x, offset, mask)]
      path = onnx_export.convert(op, specs, tmp_path / f"dcnv3_{case}.onnx",
                                 enable_double_precision=dtype == np.float64)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "GridSample" in ops and not ops & {"GatherND", "GatherElements", "ScatterND"}, ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for batch in (n, 1):  # the batch is symbolic
      got = session.run(None, dict(zip(names, (x[:batch], offset[:batch], mask[:batch]))))[0]
      assert got.dtype == dtype
      assert_rel_close(got, want[:batch], 1e-5 if dtype == np.float32 else 1e-12,
                       f"case {case} batch {batch}")


def _op_types(graph) -> set[str]:
  """Every operator of an ONNX graph, inside loop bodies too."""
  import onnx

  ops = set()
  for node in graph.node:
    ops.add(node.op_type)
    for attribute in node.attribute:
      if attribute.type == onnx.AttributeProto.GRAPH:
        ops |= _op_types(attribute.g)
  return ops


def test_onnx_export_of_a_t_structure_classifier_runs_in_onnxruntime(tmp_path):
  _onnxruntime()
  import onnx

  pth = str(require_golden() / "model_mini_t.pth")
  out = tmp_path / "mini_onnx"
  common = ["--model", "internimage_t", "--checkpoint", pth, "--out", str(out), "--options",
            json.dumps(dict(MINI_T)), "--batch", "dynamic", "--image-size", "64"]
  assert export.main([*common, "--platforms", "cpu"]) == 0  # then replaced by the ONNX export
  assert export.main([*common, "--format", "onnx"]) == 0
  metadata = json.loads((out / export.METADATA).read_text())
  assert metadata["format"] == "onnx" and metadata["batch"] == "dynamic"
  # One self-contained file; the StableHLO export it replaced is gone.
  assert sorted(p.name for p in out.iterdir()) == [export.METADATA, onnx_export.MODEL]
  ops = _op_types(onnx.load(str(out / onnx_export.MODEL)).graph)
  assert "GridSample" in ops and "Loop" in ops  # the scanned levels
  # No data-dependent gathers (the loops' plain Gather picks a level's block weights).
  assert not ops & {"GatherND", "GatherElements", "ScatterND", "ScatterElements"}, ops
  serve = export.load(out)  # onnxruntime alone
  model = models.create("internimage_t", pretrained=pth, **MINI_T)
  model.eval()
  for batch in (1, 3):
    images = _images(batch)
    want = np.asarray(model(normalize(jnp.asarray(images))))
    got = serve(images)
    assert got.shape == (batch, 10) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), batch
