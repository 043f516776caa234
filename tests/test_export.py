"""Serving export (StableHLO through jax.export): the round trip equals the module, with a
symbolic batch; the command line as a user runs it; its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import MINI_T, REPO, require_golden
from internimage_jax import export, models
from internimage_jax.training.batch_augment import normalize


def _images(batch: int, size: int = 64) -> np.ndarray:
  return np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), np.uint8)


def test_stablehlo_round_trip_with_a_symbolic_batch(tmp_path):
  model = models.create("internimage_t", num_classes=10, rngs=nnx.Rngs(3),
                        implementation="xla", **MINI_T)  # lowers for every platform
  exported = export.export_classifier(model, image_size=64, batch=None,
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
      (["--format", "tflite"], "--format must be one of ('stablehlo',), got 'tflite'"),
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
      (["--image-size", "0"], "image_size must be a positive multiple of 32, got 0"),
  ):
    base = {"--options": options, "--image-size": "64", "--platforms": "cpu"}
    base.update(dict(zip(args[::2], args[1::2])))
    flat = [x for pair in base.items() for x in pair]
    code = export.main(["--model", "internimage_t", "--checkpoint", pth, "--out",
                        str(tmp_path / "bad"), *flat])
    err = capsys.readouterr().err
    assert code == 1 and message in err, (args, err)
    assert err.count("\n") == 1 and "Traceback" not in err
