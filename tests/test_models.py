"""DCNv3 module and InternImage networks: goldens, variants, modes, errors, init."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (MINI_H, MINI_T, assert_rel_close, golden_cases, golden_index, golden_tol,
                     load_golden, params_of, precision)
from internimage_jax import convert, models

DTYPES = [np.float32, np.float64]



@functools.cache
def _abstract(name: str) -> models.InternImage:
  """A variant built under ``nnx.eval_shape``: shapes only, nothing allocated.

  Cached because tracing the construction of the large variants takes seconds.
  """
  return nnx.eval_shape(lambda: models.create(name))


def _options(entry: dict, drop=("kind",)) -> dict:
  return {k: v for k, v in entry.items() if k not in drop}


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", golden_cases("dcnv3_module"))
def test_golden_module(case, dtype):
  g = load_golden(case)
  with precision(dtype):
    module = models.DCNv3(**_options(golden_index()[case]), param_dtype=dtype, rngs=nnx.Rngs(0))
    convert.load_state_dict(module, params_of(g))
    out, vjp = jax.vjp(module, jnp.asarray(g["input"], dtype))
    (grad_in,) = vjp(jnp.asarray(g["grad_output"], dtype))
    tol = golden_tol(dtype)
    assert_rel_close(out, g["output"], tol, "output")
    assert_rel_close(grad_in, g["grad_input"], tol, "grad_input")


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case", golden_cases("internimage"))
def test_golden_network(case, dtype):
  entry = golden_index()[case]
  g = load_golden(case)
  with precision(dtype):
    model = models.InternImage(**_options(entry), param_dtype=dtype, rngs=nnx.Rngs(0))
    convert.load_state_dict(model, params_of(g))
    model.eval()
    images = jnp.asarray(g["input_nchw"].transpose(0, 2, 3, 1), dtype)
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    features = nnx.jit(lambda m, x: m.forward_features(x))(model, images)
    tol = golden_tol(dtype, network=True)
    assert logits.dtype == dtype
    assert_rel_close(logits, g["logits"], tol, "logits")
    assert len(features) == 4
    for i, feature in enumerate(features):
      assert_rel_close(feature, g[f"stage{i + 1}_nhwc"], tol, f"level {i}")


def test_variant_structure_matches_the_spec():
  t = _abstract("internimage_t")
  # A level's blocks are one module, every parameter stacked along a leading axis.
  assert [level.blocks.norm1.scale.shape[0] for level in t.levels] == [4, 4, 18, 4]
  assert [level.blocks.dcn.group for level in t.levels] == [4, 8, 16, 32]
  h = _abstract("internimage_h")
  post = [i for i, k in enumerate(h.levels[2].post_norm_of) if k >= 0]
  assert post == [5, 11, 17, 23, 29] and h.levels[2].post_norms.scale.shape == (5, 1280)
  assert h.levels[0].blocks.dcn.dw_conv.kernel.shape == (6, 5, 5, 1, 320)
  assert h.levels[0].blocks.dcn.dw_conv.kernel.get_metadata()["out_sharding"] == (
      "layers", None, None, None, "embed")
  g = _abstract("internimage_g")
  assert [i for i, k in enumerate(g.levels[2].post_norm_of) if k >= 0] == list(range(5, 48, 6))
  assert all(level.norm is not None for level in g.levels)  # post-norm + center scale
  s = _abstract("internimage_s")
  assert all(level.norm is None for level in s.levels)  # post-norm without center scale
  assert s.levels[0].blocks.gamma1.shape == (4, 80)
  with pytest.raises(ValueError, match="unknown InternImage variant"):
    models.create("internimage_x")


# The paper's Table 1: (C1, C', L1, L3) per size.
PAPER_TABLE_1 = {"internimage_t": (64, 16, 4, 18), "internimage_s": (80, 16, 4, 21),
                 "internimage_b": (112, 16, 4, 21), "internimage_l": (160, 16, 5, 22),
                 "internimage_xl": (192, 16, 5, 24), "internimage_h": (320, 32, 6, 32)}
# What scale(T's layout, phi) gives at each size's width: the published depths depart.
SCALED_DEPTHS = {"internimage_t": (4, 4, 18, 4), "internimage_s": (4, 4, 20, 4),
                 "internimage_b": (5, 5, 20, 5), "internimage_l": (5, 5, 24, 5),
                 "internimage_xl": (5, 5, 26, 5), "internimage_h": (6, 6, 29, 6)}


def test_the_papers_stacking_and_scaling_rules():
  import math

  from internimage_jax.models import design

  for name, (c1, c_group, l1, l3) in PAPER_TABLE_1.items():
    published = models.VARIANTS[name]
    rule = models.stacking_rule(c1, c_group, l1, l3)
    assert (rule["channels"], rule["depths"], rule["groups"]) == (
        published["channels"], published["depths"], published["groups"]), name
    assert design.rule_parameters(published) == (c1, c_group, l1, l3)
    # Scaled from the origin (T's layout with this size's C') to this width: the widths
    # and groups are the published ones, the depths those of SCALED_DEPTHS.
    phi = math.log(c1 / 64) / math.log(design.BETA)
    scaled = models.scale(models.stacking_rule(64, c_group, 4, 18), phi)
    assert (scaled["channels"], scaled["groups"]) == (c1, published["groups"]), name
    assert scaled["depths"] == SCALED_DEPTHS[name], name
  with pytest.raises(ValueError, match=r"do not follow the stacking rules: depths \(2, 2, 48, 4\)"):
    design.rule_parameters(models.VARIANTS["internimage_g"])  # L1 = L2 = L4 broken
  # Other options are kept; a model of a scaled layout builds (abstractly: shapes only).
  scaled = models.scale(models.VARIANTS["internimage_s"], 1.0)
  assert scaled["post_norm"] and scaled["layer_scale"] == 1e-5 and scaled["channels"] == 112
  net = nnx.eval_shape(lambda: models.InternImage(**scaled, rngs=nnx.Rngs(0)))
  assert [level.blocks.norm1.scale.shape for level in net.levels] == [
      (4, 112), (4, 224), (24, 448), (4, 896)]  # L1 round(4.36), D' round(33 x 1.09) = 36
  for call, match in ((lambda: models.stacking_rule(60, 16, 4, 18), "divisible by c_group"),
                      (lambda: models.stacking_rule(64, 16, 5, 4), "must not exceed l3"),
                      (lambda: models.stacking_rule(64, 16, 4.0, 18), "l1 must be a positive"),
                      (lambda: models.stacking_rule(64, 0, 4, 18), "c_group must be a positive"),
                      (lambda: models.scale(models.VARIANTS["internimage_t"], -1), "phi must be"),
                      (lambda: models.scale(models.VARIANTS["internimage_t"], 1, alpha=0.9),
                       "alpha and beta must be >= 1"),
                      (lambda: models.scale({"channels": 64}, 1), "'depths' is missing")):
    with pytest.raises(ValueError, match=match):
      call()


def test_kernel_shape_table_agrees_with_the_variants():
  """pallas_kernels keeps its own table of the real-model operator shapes (it imports
  nothing from the model package): it must say what the variants say."""
  from internimage_jax.models.variants import IMAGE_SIZES, VARIANTS
  from pallas_kernels.dcnv3 import shapes

  assert shapes.VARIANTS.keys() == VARIANTS.keys()
  for name, (stem, groups, offset_scale, size) in shapes.VARIANTS.items():
    options = VARIANTS[name]
    assert (stem, groups, size) == (options["channels"], options["groups"], IMAGE_SIZES[name])
    assert offset_scale == options.get("offset_scale", 1.0), name


def test_feature_api_shapes_and_strides():
  model = models.create("internimage_t", num_classes=7, **MINI_T)
  model.eval()
  x = jnp.zeros((2, 64, 96, 3))
  features = model.forward_features(x)
  assert [f.shape for f in features] == [
      (2, 16, 24, 16), (2, 8, 12, 32), (2, 4, 6, 64), (2, 2, 3, 128)]
  assert model(x).shape == (2, 7)
  headless = models.create("internimage_t", num_classes=0, **MINI_T)
  assert headless(x).shape == (2, 192)  # pooled embedding (1.5 * 128)


def test_drop_path_follows_train_and_eval_modes():
  model = models.create("internimage_t", num_classes=5, drop_path_rate=0.5, drop_rate=0.2,
                        rngs=nnx.Rngs(params=0, dropout=1), **MINI_T)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  assert model.levels[0].blocks.drop_path.deterministic  # new models evaluate
  np.testing.assert_array_equal(model(x), model(x))
  model.train()
  model.head_norm.use_running_average = True  # isolate the stochastic layers
  train_a, train_b = model(x), model(x)
  assert not np.allclose(train_a, train_b), "training mode must draw new drop masks"
  model.eval()
  eval_a, eval_b = model(x), model(x)
  np.testing.assert_array_equal(eval_a, eval_b)
  model.train()
  assert model.levels[3].blocks.drop_path.deterministic is False
  # Stochastic depth rises linearly from 0 to drop_path_rate over the 5 blocks.
  depths = [level.blocks.norm1.scale.shape[0] for level in model.levels]
  rates = [1 - k for level, d in zip(model.levels, depths) for k in level.keep or (1.0,) * d]
  np.testing.assert_allclose(rates, np.linspace(0, 0.5, 5))


def test_batchnorm_updates_running_stats_like_pytorch():
  model = models.create("internimage_t", num_classes=3, **MINI_T)
  model.train()
  bn = model.head_norm
  x = jax.random.normal(jax.random.key(1), (4, 2, 2, bn.weight.shape[0])) * 3 + 1
  bn(x)
  flat = np.asarray(x).reshape(-1, x.shape[-1])
  np.testing.assert_allclose(bn.running_mean[...], 0.1 * flat.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.running_var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  assert int(bn.num_batches_tracked[...]) == 1


def test_initialisation_follows_the_original():
  module = models.DCNv3(channels=32, group=4, center_feature_scale=True, rngs=nnx.Rngs(0))
  for name in ("offset", "mask"):
    layer = getattr(module, name)
    np.testing.assert_array_equal(layer.kernel[...], 0)
    np.testing.assert_array_equal(layer.bias[...], 0)
  np.testing.assert_array_equal(module.center_feature_scale_proj_weight[...], 0)
  bound = np.sqrt(6 / (32 + 32))  # Xavier-uniform
  kernel = np.asarray(module.input_proj.kernel[...])
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.8 * bound
  np.testing.assert_array_equal(module.input_proj.bias[...], 0)
  # With zero offsets and a uniform mask a fresh module averages the 3x3 window.
  x = jax.random.normal(jax.random.key(2), (1, 6, 6, 32))
  v = module.input_proj(x)
  padded = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0)))
  window = sum(padded[:, i:i + 6, j:j + 6] for i in range(3) for j in range(3)) / 9
  # center_feature_scale starts at sigmoid(0) = 0.5 between sampled and projected input.
  np.testing.assert_allclose(module(x), module.output_proj(0.5 * window + 0.5 * v), atol=1e-5)



def _init_kind(path: tuple, shape: tuple, conv_fan_in: dict) -> tuple[str, float]:
  """The original's initialisation of the parameter at ``path`` (spec section 3) as
  ``(distribution, value or standard deviation)``."""
  name, leaf = path[-2], path[-1]
  if path[:-1] in conv_fan_in:  # PyTorch's conv default: U(+-1/sqrt(fan_in)), bias too
    return "uniform", 1 / np.sqrt(conv_fan_in[path[:-1]]) / np.sqrt(3)
  if leaf == "kernel" and name in ("offset", "mask"):
    return "constant", 0.0
  if leaf == "kernel" and name in ("input_proj", "output_proj"):
    return "uniform", np.sqrt(6 / (shape[-2] + shape[-1])) / np.sqrt(3)  # Xavier
  if leaf == "kernel":
    return "normal", 0.02  # timm's trunc_normal_(std=0.02)
  if leaf in ("gamma1", "gamma2"):
    return "constant", 1e-5
  if leaf in ("scale", "weight"):
    return "constant", 1.0
  return "constant", 0.0  # biases of linears and norms, center-feature-scale projection


@pytest.mark.parametrize("name", ["internimage_s", "internimage_h"])
def test_initialisation_of_every_parameter_kind(name):
  """Each kind of parameter drawn as the original does, per level from one vmapped
  draw with a distinct key per block (small widths, the variant's structure)."""
  small = dict(channels=16, depths=(2, 2, 7, 2), groups=(1, 2, 4, 8))
  if name == "internimage_h":
    small.update(channels=32, level2_post_norm_block_ids=(2, 5))
  model = models.create(name, num_classes=10, rngs=nnx.Rngs(0), **small)
  params = [(tuple(map(str, path)), np.asarray(var.get_value()))
            for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))]
  conv_fan_in = {path[:-1]: np.prod(value.shape[-4:-1]) for path, value in params
                 if path[-1] == "kernel" and value.ndim - ("blocks" in path) == 4}
  seen = set()
  for path, value in params:
    kind, scale = _init_kind(path, value.shape, conv_fan_in)
    seen.add(kind)
    where = "/".join(path)
    if kind == "constant":
      np.testing.assert_array_equal(value, np.float32(scale), err_msg=where)
      continue
    value = value.astype(np.float64)
    # Mean and standard deviation within 4 standard errors (a normal's and a uniform's
    # sample std have relative standard errors 1/sqrt(2n) and 1/sqrt(5n/4)).
    assert abs(value.mean()) < 4 * scale / np.sqrt(value.size), where
    assert abs(value.std() / scale - 1) < 4 / np.sqrt(value.size), where
    if kind == "uniform":
      assert np.abs(value).max() <= scale * np.sqrt(3) + 1e-7, where
    if "blocks" in path:  # stacked: every block its own draw
      assert not np.array_equal(value[0], value[1]), where
  assert seen == {"constant", "uniform", "normal"}


def test_bfloat16_compute_runs_and_tracks_float32():
  model = models.create("internimage_t", num_classes=4, **MINI_T)
  model.eval()
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  want = model(x)
  fast = models.create("internimage_t", num_classes=4, dtype=jnp.bfloat16, **MINI_T)
  nnx.update(fast, nnx.state(model))
  fast.eval()
  got = fast(x)
  assert got.dtype == jnp.bfloat16
  assert fast.levels[0].blocks.dcn.input_proj.kernel.dtype == jnp.float32  # master weights
  assert_rel_close(got, want, 0.1, "bf16 logits")
  # A float32 layer scale (S..XL, segmentation T) must not promote the activations: the
  # scan over a level's blocks needs its carry to keep its dtype.
  scaled = jax.eval_shape(lambda: models.create(
      "internimage_s", num_classes=4, dtype=jnp.bfloat16, **MINI_T)(x))
  assert scaled.dtype == jnp.bfloat16


def test_train_step_reduces_loss():
  import optax

  model = models.create("internimage_t", num_classes=3, **MINI_H)
  model.train()
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(4), (4, 32, 32, 3))
  y = jnp.array([0, 1, 2, 0])

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
  assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("build,match", [
    (lambda: models.DCNv3(channels=30, group=4, rngs=nnx.Rngs(0)), "divisible by group"),
    (lambda: models.DCNv3(channels=32, group=4, kernel_size=4, remove_center=True,
                          rngs=nnx.Rngs(0)), "odd kernel_size"),
    (lambda: models.create("internimage_t", groups=(3, 8, 16, 32)), "not divisible"),
    (lambda: models.create("internimage_t", depths=(1, 1, 1)), "4 entries"),
    (lambda: models.create("internimage_t", level2_post_norm=True,
                           level2_post_norm_block_ids=(30,)), "out of range"),
    (lambda: models.create("internimage_s", res_post_norm=True), "res_post_norm"),
    (lambda: models.create("internimage_t", drop_path_rate=1.0), "drop_path_rate"),
])
def test_bad_options_are_named(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_bad_inputs_are_named():
  model = models.create("internimage_t", num_classes=3, **MINI_T)
  with pytest.raises(ValueError, match="expected NHWC"):
    model(jnp.zeros((32, 32, 3)))
  with pytest.raises(ValueError, match="input channels"):
    model(jnp.zeros((1, 3, 32, 32)))
  clip = models.create("internimage_h", num_classes=3, **MINI_H)
  with pytest.raises(ValueError, match="multiples of 32"):
    clip(jnp.zeros((1, 48, 64, 3)))
  module = models.DCNv3(channels=16, group=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected input \[N, H, W, 16\]"):
    module(jnp.zeros((1, 4, 4, 8)))


@pytest.mark.parametrize("remat", ["block", "dots"])
def test_remat_gives_the_same_loss_and_gradients(remat):
  """Rematerialised blocks (drop path on: the recomputation draws the same masks), in
  float64 so that only a real difference could show."""

  def run(mode):
    model = models.create("internimage_t", num_classes=10, channels=16, depths=(1, 1, 2, 1),
                          groups=(1, 2, 4, 8), drop_path_rate=0.2, remat=mode,
                          param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    model.train()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float64)
    loss, grads = nnx.value_and_grad(lambda m: jnp.sum(m(x) ** 2))(model)
    return loss, jax.tree.leaves(grads)

  with precision(np.float64):
    loss, grads = run("none")
    loss_r, grads_r = run(remat)
  assert float(loss_r) == pytest.approx(float(loss), rel=1e-10)
  scale = max(float(jnp.max(jnp.abs(g))) for g in grads)
  for g, g_r in zip(grads, grads_r):
    np.testing.assert_allclose(g_r, g, atol=1e-9 * scale)
  with pytest.raises(ValueError, match="remat must be"):
    models.create("internimage_t", remat="everything")
