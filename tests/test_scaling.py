"""Large-model training mechanics: stacked, scanned levels, rematerialisation that saves
memory on XLA:CPU too, placement by logical axis rules, FSDP without channel-sharded
activations, the row-chunked DCNv3 backward."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from helpers import QUICK_CODEGEN, precision
from internimage_jax import models
from internimage_jax.models.layers import DropPath
from internimage_jax.models.remat import late_remat, remat_call, scan_remat

REPO = Path(__file__).resolve().parents[1]

MINI_T = dict(channels=16, depths=(2, 1, 2, 1), groups=(1, 2, 4, 8))
# H options with level-2 post-norms after blocks 2 and 5 of 8: one scan over the 8
# blocks, the post-norm switched on at steps 2 and 5.
MINI_H = dict(channels=16, depths=(1, 1, 8, 1), groups=(2, 4, 8, 16), dw_kernel_size=5,
              res_post_norm=True, level2_post_norm=True, level2_post_norm_block_ids=(2, 5),
              center_feature_scale=True, use_clip_projector=True)


def _loss_and_grads(name, options, **kw):
  model = models.create(name, num_classes=10, drop_path_rate=0.3, param_dtype=jnp.float64,
                        rngs=nnx.Rngs(0), **options, **kw)
  model.train()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float64)
  loss_fn = lambda m: jnp.sum(m(x) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  again = loss_fn(model)  # the RNG counts moved as in the unrolled model
  return float(loss), float(again), jax.tree.leaves(nnx.state(grads))


@pytest.mark.parametrize("name, options, modes", [
    ("internimage_t", MINI_T, ["block", "dots"]),
    ("internimage_s", MINI_T, ["block"]),
    ("internimage_h", MINI_H, ["block"])], ids=["t", "s", "h"])
def test_remat_modes_give_the_same_loss_gradients_and_draws(name, options, modes):
  """Each remat mode against none, in float64 and in training mode: the scanned blocks
  draw the same drop-path masks in the recomputation, and the RNG counts move the same."""
  with precision(np.float64):
    ref = _loss_and_grads(name, options, remat="none")
    scale = max(float(jnp.max(jnp.abs(g))) for g in ref[2])
    assert ref[0] != pytest.approx(ref[1], rel=1e-6)  # the second call drew new masks
    for remat in modes:
      got = _loss_and_grads(name, options, remat=remat)
      assert got[:2] == pytest.approx(ref[:2], rel=1e-12), remat
      assert len(got[2]) == len(ref[2])
      for g, want in zip(got[2], ref[2]):
        np.testing.assert_allclose(g, want, atol=1e-11 * scale, err_msg=remat)


def test_level2_post_norms_run_after_their_blocks_only():
  """H's level-2 post-norms (data in the scan: a flag and an index per block) equal
  running the stacked blocks one by one with the norms after blocks 2 and 5."""
  model = models.create("internimage_h", num_classes=0, rngs=nnx.Rngs(1), **MINI_H)
  level = model.levels[2]
  # Non-trivial post-norm parameters, a different one per norm.
  post = nnx.state(level.post_norms)
  nnx.update(level.post_norms, jax.tree.map(
      lambda a: a + jax.random.normal(jax.random.key(2), a.shape), post))
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 64))
  graphdef, params = nnx.split(level.blocks)
  norms_def, norms = nnx.split(level.post_norms)
  want = x
  for i in range(8):
    want = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], params))(want)
    if i in (2, 5):
      want = nnx.merge(norms_def, jax.tree.map(lambda a: a[(2, 5).index(i)], norms))(want)
  got, _ = level(x)
  np.testing.assert_allclose(got, level.norm(want), rtol=1e-5, atol=1e-5)


def test_train_state_size_does_not_grow_with_depth():
  """Twice the blocks, the same number of state arrays (what the optimizer update, EMA
  and gradient norm compile per); weight decay by the rank of one block's parameter."""
  from internimage_jax.training import optim
  from internimage_jax.training.config import base_config
  from internimage_jax.training.trainer import TrainProgram

  def program(depths):
    cfg = base_config()
    cfg.model.name = "internimage_h"
    cfg.model.remat = "block"
    cfg.model.overrides.update({**MINI_H, "depths": depths})
    cfg.data.image_size = 32
    cfg.train.update(global_batch=1, layer_decay=0.9)  # per-block LR multipliers too
    cfg.mesh = type(cfg.mesh)({"data": 1})
    return TrainProgram(cfg, num_classes=10, steps_per_epoch=10)

  small, deep = program((1, 1, 8, 1)), program((2, 2, 16, 2))
  arrays = lambda p: len(jax.tree.leaves(p.abstract_state))
  elements = lambda p: sum(x.size for x in jax.tree.leaves(p.abstract_state["params"]))
  assert arrays(small) == arrays(deep) and elements(deep) > elements(small)

  params = nnx.to_flat_state(small.abstract_state["params"])
  mask = nnx.to_flat_state(optim.decay_mask(small.abstract_state["params"]))
  # One block's rank: the stacked levels and post-norms have one more dimension.
  stacked = lambda path: "blocks" in path or "post_norms" in path
  want = [len(v.get_value().shape) - stacked(path) > 1 for path, v in params]
  assert [m.get_value() for _, m in mask] == want and any(want) and not all(want)


def test_placement_by_logical_axis_rules():
  """The default rule table: channels ("embed") over fsdp, the MLP's hidden units and the
  clip projector's attention features over model (fc1 and q/k/v split their outputs, fc2
  and the projection their inputs); the stacked axis, vectors and what FSDP does not
  divide stay whole, what tensor parallelism does not divide is an error; at use,
  parameters are whole over the batch axes."""
  from types import SimpleNamespace

  from internimage_jax.models.partitioning import DEFAULT_RULES, logical_spec

  mesh = SimpleNamespace(shape={"data": 1, "fsdp": 2, "model": 2})
  spec = lambda shape, *names, rules=DEFAULT_RULES: logical_spec(names, shape, mesh, rules)
  assert spec((64, 256), "embed", "mlp") == P("fsdp", "model")  # fc1
  assert spec((256,), "mlp") == P("model")
  assert spec((256, 64), "mlp", "embed") == P("model", "fsdp")  # fc2
  assert spec((64,), None) == P(None)
  assert spec((1024, 1024), "embed", "heads") == P("fsdp", "model")  # q, k, v
  assert spec((4, 64, 256), "layers", "embed", "mlp") == P(None, "fsdp", "model")
  assert spec((7, 6), "embed", "mlp") == P(None, "model")  # FSDP: 7 stays whole
  with pytest.raises(ValueError, match=r"dimension 1 \(mlp, size 7\) cannot split 2 ways"):
    spec((8, 7), "embed", "mlp")  # tensor parallelism must divide
  assert spec((8, 8), "embed", "embed") == P("fsdp", None)  # an axis serves once
  at_use = {**DEFAULT_RULES, "embed": None}
  assert spec((64, 256), "embed", "mlp", rules=at_use) == P(None, "model")
  # The model's own names: every linear and convolution kernel has an FSDP dimension.
  model = nnx.eval_shape(lambda: models.create("internimage_h", num_classes=10, **MINI_H))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata()["out_sharding"]
    assert len(names) == len(var.get_value().shape), path
    if path[-1] == "kernel":
      assert "embed" in names, path
  from internimage_jax.training import config as config_lib
  from internimage_jax.training import sharding
  cfg = config_lib.base_config()
  cfg.axis_rules.update(embed="None", layers="model")  # as the command line sets them
  assert config_lib.axis_rules(cfg) == {**DEFAULT_RULES, "embed": None, "layers": "model"}
  with pytest.raises(ValueError, match="unknown axis 'fdsp'"):
    sharding.make_mesh({"data": 1, "fdsp": 1})


_TENSOR_PARALLEL = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
from internimage_jax.training.config import base_config
from internimage_jax.training.trainer import TrainProgram
out = {}
for mesh in ({"data": 1, "fsdp": 4}, {"data": 1, "fsdp": 2, "model": 2}):
    cfg = base_config()
    cfg.model.name = "internimage_h"
    cfg.model.remat = "block"
    cfg.model.overrides.update(json.loads(sys.argv[1]))
    cfg.data.image_size = 32
    cfg.train.global_batch = 4
    cfg.mesh = type(cfg.mesh)(mesh)
    program = TrainProgram(cfg, num_classes=10, steps_per_epoch=10)
    state, rng = program.init()
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8),
                            program.batch_sharding)
    labels = jax.device_put(np.arange(4, dtype=np.int32), program.batch_sharding)

    def loss_and_grads(state, rng_state, x, y):
        def loss(params):
            model = nnx.merge(program.graphdef, params, state["batch_stats"],
                              rng_state, copy=True)
            model.eval()
            logits = model(x.astype(jnp.float32) / 255)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return jax.value_and_grad(loss)(state["params"])

    run = jax.jit(loss_and_grads, in_shardings=(program.state_shardings, program.rng_shardings,
                                                program.batch_sharding, program.batch_sharding),
                  out_shardings=(program.replicated, program.state_shardings["params"]))
    loss, grads = run(state, rng, images, labels)
    fc1 = state["params"]["levels"][2]["blocks"]["mlp"]["fc1"]["kernel"]
    row = {"loss": float(loss), "grads": [np.asarray(g).tolist() for g in jax.tree.leaves(grads)],
           "fc1": [fc1.shape, fc1.addressable_shards[0].data.shape]}
    if "model" in mesh:  # the full step once, under tensor parallelism
        state, metrics = program.train_step(state, rng, {"image": images, "label": labels})
        row["step_loss"] = float(metrics["loss"])
    out[",".join(mesh)] = row
print(json.dumps(out))
"""


def test_tensor_parallel_matches_fsdp():
  """Tensor parallelism over a ``model`` axis (2 x 2 devices with FSDP) computes the
  gradients of FSDP over 4 devices, holds a quarter of each MLP matrix per device, and
  trains (the full step: remat, scanned levels, clip projector)."""
  options = dict(MINI_H, depths=(1, 1, 2, 1), level2_post_norm_block_ids=(1,))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {QUICK_CODEGEN}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _TENSOR_PARALLEL, json.dumps(options)], cwd=REPO,
                        env=env, capture_output=True, text=True, check=True)
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  fsdp, tp = out["data,fsdp"], out["data,fsdp,model"]
  assert tp["loss"] == pytest.approx(fsdp["loss"], rel=1e-5)
  scale = max(np.max(np.abs(g)) for g in fsdp["grads"])
  for got, want in zip(tp["grads"], fsdp["grads"]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
  (blocks, cin, hidden), shard = tp["fc1"]
  assert shard == [blocks, cin // 2, hidden // 2]  # fsdp 2 x model 2
  assert np.isfinite(tp["step_loss"])


def test_remat_helpers_match_plain_autodiff():
  def step(x, xs):
    w, key, count = xs
    keep = jax.random.bernoulli(jax.random.fold_in(key, count), 0.7, x.shape)
    return jnp.where(keep, jnp.sin(x * w), 0.0), count + 1

  xs = (jnp.arange(1.0, 5.0), jax.random.split(jax.random.key(0), 4),
        jnp.arange(4, dtype=jnp.uint32))
  x = jnp.linspace(-1.0, 1.0, 16)

  def loss(scan, x, w):
    return jnp.sum(scan(step, x, (w, *xs[1:]))[0] ** 2)

  want = jax.grad(lambda x, w: loss(jax.lax.scan, x, w), (0, 1))(x, xs[0])
  got = jax.grad(lambda x, w: loss(scan_remat, x, w), (0, 1))(x, xs[0])
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-6)

  f = lambda w, x: jnp.cos(jnp.sin(x * w) * w)
  want = jax.grad(lambda w: jnp.sum(f(w, f(w, x))))(2.0)
  got = jax.grad(lambda w: jnp.sum(late_remat(f)(w, late_remat(f)(w, x))))(2.0)
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_remat_call_recomputes_with_the_same_random_draws():
  """A rematerialised module call must not move the RNG counts it saved (it once did,
  and the backward pass then drew other drop-path masks than the forward)."""

  class Net(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.arange(1.0, 17.0))
      self.drop = DropPath(rngs=nnx.Rngs(3))

    def __call__(self, x):
      return self.drop(jnp.sin(x * self.w[...]), 0.5)

  def run(remat):
    net = Net()
    x = jnp.linspace(0.0, 1.0, 16)[None].repeat(8, 0)

    def loss(net):
      y = x
      for _ in range(2):
        y = remat_call(Net.__call__, net, y) if remat else net(y)
      return jnp.sum(y ** 2)

    loss, grads = nnx.value_and_grad(loss)(net)
    return float(loss), np.asarray(grads.w[...]), int(net.drop.rngs.count[...])

  plain, rematted = run(False), run(True)
  assert rematted[0] == pytest.approx(plain[0])
  np.testing.assert_allclose(rematted[1], plain[1], rtol=1e-6)
  assert rematted[2] == plain[2]


def test_dcnv3_row_chunked_backward_equals_whole(monkeypatch):
  from pallas_kernels.dcnv3 import dcnv3, reference

  rng = np.random.default_rng(0)
  n, h, c, g = 2, 12, 16, 2
  x = jnp.asarray(rng.normal(size=(n, h, h, c)), jnp.float32)
  offset = jnp.asarray(rng.normal(size=(n, h, h, g * 18)) * 2, jnp.float32)
  mask = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, h, h, g, 9)), jnp.float32), -1)
  mask = mask.reshape(n, h, h, g * 9)
  weights = jnp.cos(jnp.arange(c, dtype=jnp.float32))
  loss = lambda *a: jnp.sum(dcnv3(*a, group=g) * weights)
  want = jax.grad(loss, (0, 1, 2))(x, offset, mask)
  monkeypatch.setattr(reference, "_ROW_CHUNK_BYTES", 0)
  monkeypatch.setattr(reference, "images_per_chunk", lambda batch, *_: batch)
  assert reference.row_chunks(n, h, h, c, 4) == 4
  jax.clear_caches()
  got = jax.grad(loss, (0, 1, 2))(x, offset, mask)
  jax.clear_caches()
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.max(jnp.abs(b))))


# One process (the device count is fixed when JAX starts) compiles the train steps of
# small models on 4 fake devices, reporting per-device temporaries and all-to-alls.
_COMPILE = r"""
import json, re, sys
import jax
from internimage_jax.training.config import base_config
from internimage_jax.training.trainer import TrainProgram
SMALL = {
    "internimage_h": dict(channels=16, depths=[2, 1, 4, 1], groups=[2, 4, 8, 16],
                          level2_post_norm_block_ids=[1, 3]),
    "internimage_t": dict(channels=16, depths=[2, 2, 4, 2], groups=[1, 2, 4, 8]),
}
out = {}
for name, mesh, remat in json.loads(sys.argv[1]):
    cfg = base_config()
    cfg.model.name = name
    cfg.model.remat = remat
    cfg.model.overrides.update(SMALL[name])
    cfg.data.image_size = 128
    cfg.train.global_batch = 16
    cfg.mesh = type(cfg.mesh)({k: int(v) for k, v in (i.split("=") for i in mesh.split(","))})
    program = TrainProgram(cfg, num_classes=10, steps_per_epoch=10)
    compiled = program.train_step.lower(*program.abstract_inputs()).compile()
    stacked = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(
        program.state_shardings)[0] if "'blocks'" in jax.tree_util.keystr(path)]
    out[f"{name} {mesh} {remat}"] = {
        "temp": compiled.memory_analysis().temp_size_in_bytes,
        "all_to_all": len(re.findall(r" all-to-all\(", compiled.as_text())),
        # Block-stacked state: the block axis never split, most stacks split elsewhere.
        "stacked_block_axis_split": sum(len(p) > 0 and p[0] is not None for p in stacked),
        "stacked_split": sum(any(a is not None for a in p) for p in stacked) / len(stacked)}
print(json.dumps(out))
"""


def _compiled_steps(runs: list[tuple[str, str, str]]) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count=4 {QUICK_CODEGEN}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(runs)], cwd=REPO, env=env,
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


# A memory property of XLA's partitioning, not a component: FSDP with every H option
# trains for real in tests/test_multiprocess.py.
@pytest.mark.slow
def test_fsdp_keeps_activations_batch_sharded():
  """FSDP over 4 devices needs about the activation memory of pure data parallelism:
  each block gathers its weights, and activations are never resharded by channel
  (the depthwise conv and the clip head once made XLA all-to-all them)."""
  compiled = _compiled_steps([("internimage_h", "data=1,fsdp=4", "block"),
                              ("internimage_h", "data=4,fsdp=1", "block")])
  fsdp = compiled["internimage_h data=1,fsdp=4 block"]
  data = compiled["internimage_h data=4,fsdp=1 block"]
  assert fsdp["all_to_all"] == 0, fsdp
  assert fsdp["temp"] < 1.3 * data["temp"], (fsdp, data)
  # The block-stacked state is split like one block's parameters, block axis whole.
  assert fsdp["stacked_block_axis_split"] == 0 and fsdp["stacked_split"] > 0.3, fsdp


def test_block_remat_saves_memory_on_cpu():
  """remat="block" lowers the compiled temporaries on XLA:CPU too, whose CSE merges a
  plain jax.checkpoint's recomputation back into the forward pass."""
  compiled = _compiled_steps([("internimage_t", "data=1,fsdp=4", "block"),
                              ("internimage_t", "data=1,fsdp=4", "none")])
  none = compiled["internimage_t data=1,fsdp=4 none"]
  block = compiled["internimage_t data=1,fsdp=4 block"]
  assert block["temp"] < 0.5 * none["temp"], (block, none)
