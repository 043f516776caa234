"""UperNet segmentation (spec segmentation.md): heads and the mini segmentor against the
mmseg goldens, conversion of the mmseg checkpoint layout, the official configurations,
training mode and errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import (assert_rel_close, golden_index, golden_tol, load_golden, params_of,
                     precision, require_golden)
from internimage_jax import convert, models
from internimage_jax.models.segmentation import adaptive_avg_pool, cross_entropy, resize

DTYPES = [np.float32, np.float64]
# seg_mini_t's backbone and heads (golden README, index_seg.json).
MINI_BACKBONE = dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), layer_scale=1.0,
                     offset_scale=1.0, post_norm=False, drop_path_rate=0.0)
# Spec section 8: state-dict entries of each official UperNet (with the auxiliary head).
KEY_COUNTS = {"upernet_internimage_t": 767, "upernet_internimage_s": 825,
              "upernet_internimage_b": 825, "upernet_internimage_l": 913,
              "upernet_internimage_xl": 957, "upernet_internimage_h": 1417}


def nhwc(a: np.ndarray) -> np.ndarray:
  return a.transpose(0, 2, 3, 1)


def _head_options(config: dict) -> dict:
  keep = {"in_channels", "channels", "num_classes", "pool_scales", "dropout_ratio",
          "align_corners", "in_index", "num_convs", "kernel_size", "dilation", "concat_input"}
  options = {k: v for k, v in config.items() if k in keep}
  if isinstance(options.get("in_index"), list):  # UperHead reads all four maps, in order
    assert options.pop("in_index") == [0, 1, 2, 3]
  return options


@functools.cache
def _built_mini_segmentor(dtype_name: str) -> models.Segmentor:
  return models.create_segmentor(
      num_classes=7, backbone=MINI_BACKBONE, decode_head=dict(channels=32),
      auxiliary_head=dict(channels=16), param_dtype=np.dtype(dtype_name), rngs=nnx.Rngs(0))


def _mini_segmentor(dtype) -> models.Segmentor:
  """The golden's segmentor, freshly initialised: a copy of one built per dtype (eager
  construction takes seconds on two cores)."""
  return nnx.clone(_built_mini_segmentor(np.dtype(dtype).name))


@nnx.jit
def _head_vjp(head, inputs, cotangent):
  out, vjp = jax.vjp(head, inputs)
  return out, vjp(cotangent)[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("case,head_class", [("seg_head_upernet", models.UperHead),
                                             ("seg_head_fcn", models.FCNHead)])
def test_golden_head(case, head_class, dtype):
  config = golden_index("index_seg.json")[case]["config"]
  g = load_golden(case)
  with precision(dtype):
    head = head_class(**_head_options(config), param_dtype=dtype, rngs=nnx.Rngs(0))
    convert.load_state_dict(head, params_of(g))
    inputs = [jnp.asarray(nhwc(g[f"input{i}"]), dtype) for i in range(4)]
    out, grads = _head_vjp(head, inputs, jnp.asarray(nhwc(g["grad_output"]), dtype))
    tol = golden_tol(dtype)
    assert out.dtype == dtype
    assert_rel_close(out, nhwc(g["output"]), tol, "output")
    for i, grad in enumerate(grads):
      want = nhwc(g[f"grad_input{i}"])
      if not np.any(want):  # a level the head does not read (FCN: all but in_index)
        assert not np.any(np.asarray(grad)), f"grad_input{i} should be zero"
      else:
        assert_rel_close(grad, want, tol, f"grad_input{i}")


def _head_loss(seg: models.Segmentor, features, labels) -> jax.Array:
  return (cross_entropy(seg.decode_head(features), labels)
          + 0.4 * cross_entropy(seg.auxiliary_head(features), labels))


@functools.partial(nnx.jit, static_argnames="end_to_end")
def _segmentor_outputs(seg: models.Segmentor, images: jax.Array, labels: jax.Array,
                       golden_features, end_to_end: bool):
  features = seg.backbone.forward_features(images)
  decode = seg.decode_head(features)
  aux = seg.auxiliary_head(features)
  if end_to_end:
    def total(model, x):
      losses = model.loss(x, labels)
      return losses["loss"], losses

    (_, losses), grad = nnx.value_and_grad(total, argnums=1, has_aux=True)(seg, images)
  else:
    losses = seg.loss(images, labels)
    # d loss / d features at the reference's features, then back through our backbone.
    cotangent = nnx.grad(_head_loss, argnums=1)(seg, golden_features, labels)
    grad = nnx.grad(lambda m, x: sum(jnp.vdot(f, c) for f, c in zip(
        m.backbone.forward_features(x), cotangent)), argnums=1)(seg, images)
  return features, decode, aux, seg(images), losses, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
def test_golden_segmentor(dtype):
  g = load_golden("seg_mini_t")
  with precision(dtype):
    seg = _mini_segmentor(dtype)
    convert.load_state_dict(seg, params_of(g))
    images = jnp.asarray(nhwc(g["input_nchw"]), dtype)
    golden_features = [jnp.asarray(nhwc(g[f"backbone{i}_nchw"]), dtype) for i in range(4)]
    # In float32 the image gradient is chained through the reference's backbone maps:
    # one pre-activation of decode_head.lateral_convs.2 is -4e-7 (1e-7 of its scale) in
    # the reference, so float32 rounding of our maps decides which side of its ReLU it
    # falls on, and a flip moves the gradient by a few percent. Float64 runs end to end.
    features, decode, aux, logits, losses, grad = _segmentor_outputs(
        seg, images, jnp.asarray(g["label"], jnp.int32), golden_features,
        end_to_end=np.dtype(dtype) == np.float64)
    tol = golden_tol(dtype, network=True)
    for i, feature in enumerate(features):
      assert_rel_close(feature, nhwc(g[f"backbone{i}_nchw"]), tol, f"backbone map {i}")
    assert logits.dtype == dtype and logits.shape == (2, 128, 96, 7)
    assert_rel_close(decode, nhwc(g["decode_logits"]), tol, "decode_logits")
    assert_rel_close(aux, nhwc(g["aux_logits"]), tol, "aux_logits")
    assert_rel_close(logits, nhwc(g["logits"]), tol, "logits")
    assert set(losses) == {"loss", "loss_decode", "loss_aux"}
    for name in losses:
      assert_rel_close(losses[name], g[name], tol, name)
    assert_rel_close(grad, nhwc(g["grad_input_nchw"]), tol, "grad_input")


def test_mmseg_checkpoint_file_loads_and_round_trips(tmp_path):
  golden_dir = require_golden()
  g = load_golden("seg_mini_t")
  seg = _mini_segmentor(jnp.float32)
  assert convert.load_checkpoint(seg, golden_dir / "seg_mini_t.pth") == convert.LoadReport(
      [], [], [])
  params = params_of(g)
  state = convert.to_state_dict(seg)
  # The mmseg layout exactly: same keys (num_batches_tracked included), same values.
  assert sorted(state) == sorted(params)
  for key, want in params.items():
    np.testing.assert_array_equal(state[key], want, err_msg=key)
  # Round trip into a freshly initialised segmentor, wrapped as mmseg saves it.
  other = _mini_segmentor(jnp.float32)
  assert not np.array_equal(convert.to_state_dict(other)["decode_head.conv_seg.weight"],
                            state["decode_head.conv_seg.weight"])
  convert.load_state_dict(other, {"state_dict": state, "meta": {"iter": 1}})
  again = convert.to_state_dict(other)
  assert sorted(again) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(again[key], state[key], err_msg=key)


def test_strict_load_lists_problems():
  g = load_golden("seg_mini_t")
  params = params_of(g)
  seg = _mini_segmentor(jnp.float32)
  bad = dict(params)
  del bad["decode_head.psp_modules.2.1.conv.weight"]
  bad["auxiliary_head.conv_cat.conv.weight"] = np.zeros((16, 80, 3, 3), np.float32)
  bad["decode_head.conv_seg.bias"] = np.zeros(8, np.float32)
  with pytest.raises(convert.CheckpointMismatchError) as err:
    convert.load_state_dict(seg, bad)
  message = str(err.value)
  for key in ("decode_head.psp_modules.2.1.conv.weight", "auxiliary_head.conv_cat.conv.weight",
              "decode_head.conv_seg.bias"):
    assert key in message
  # Without num_batches_tracked (e.g. a file saved by another tool) the load is complete.
  convert.load_state_dict(seg, {k: v for k, v in params.items()
                                if not k.endswith("num_batches_tracked")})


@functools.cache
def _abstract_segmentor(name: str) -> models.Segmentor:
  return nnx.eval_shape(lambda: models.create_segmentor(name))


def test_official_configurations_key_counts():
  for name, count in KEY_COUNTS.items():
    keys = convert.state_dict_keys(_abstract_segmentor(name))
    assert len(keys) == count, name
    assert sum(k.startswith("decode_head.") for k in keys) == 74, name
    assert sum(k.startswith("auxiliary_head.") for k in keys) == 8, name
  t = convert.state_dict_keys(_abstract_segmentor("upernet_internimage_t"))
  # Segmentation T has layer scale; no classification head in the backbone.
  assert "backbone.levels.2.blocks.17.gamma2" in t
  assert not any(k.startswith(("backbone.conv_head", "backbone.head")) for k in t)
  assert "decode_head.psp_modules.3.1.bn.num_batches_tracked" in t
  t = _abstract_segmentor("upernet_internimage_t")
  assert t.decode_head.conv_seg.kernel.shape == (1, 1, 512, 150)
  assert t.auxiliary_head.convs[0].conv.kernel.shape == (3, 3, 256, 256)
  h = _abstract_segmentor("upernet_internimage_h")
  assert h.decode_head.lateral_convs[0].conv.kernel.shape == (1, 1, 320, 512)
  assert h.auxiliary_head.convs[0].conv.kernel.shape == (3, 3, 1280, 256)


def test_overrides_and_no_auxiliary_head():
  seg = nnx.eval_shape(lambda: models.create_segmentor(
      "upernet_internimage_s", num_classes=19,
      backbone=dict(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8)),
      decode_head=dict(channels=24), auxiliary_head=False))
  assert seg.auxiliary_head is None
  assert seg.decode_head.in_channels == (16, 32, 64, 128)
  assert seg.decode_head.conv_seg.kernel.shape == (1, 1, 24, 19)
  keys = convert.state_dict_keys(seg)
  assert not any(k.startswith("auxiliary_head.") for k in keys)
  # S's post_norm stays (no level-end norms) unless overridden.
  assert not any(".norm.0." in k for k in keys if k.startswith("backbone.levels."))


def test_resize_and_pooling_follow_pytorch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 4, 3, 5))
  with precision(np.float64):
    for size in [(6, 4), (2, 2), (4, 3), (7, 9), (1, 1)]:
      got = resize(jnp.asarray(x), size)
      want = torch.nn.functional.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=size,
                                             mode="bilinear", align_corners=False)
      np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-12)
    for scale in (1, 2, 3, 6):
      got = adaptive_avg_pool(jnp.asarray(x), scale)
      want = torch.nn.functional.adaptive_avg_pool2d(torch.tensor(x).permute(0, 3, 1, 2), scale)
      np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-12)


def test_fcn_head_dilation_and_concat_input_follow_pytorch():
  torch = pytest.importorskip("torch")
  F = torch.nn.functional
  with precision(np.float64):
    head = models.FCNHead(in_channels=6, channels=4, num_classes=3, in_index=0, num_convs=2,
                          dilation=2, concat_input=True, param_dtype=np.float64,
                          rngs=nnx.Rngs(1))
    x = np.random.default_rng(5).standard_normal((1, 7, 9, 6))
    got = head([jnp.asarray(x)])
  sd = {k: torch.tensor(v) for k, v in convert.to_state_dict(head).items()}

  def conv_module(t, name, padding, dilation):  # BN at its init: weight 1, statistics 0/1
    t = F.conv2d(t, sd[f"{name}.conv.weight"], padding=padding, dilation=dilation)
    return torch.relu(t / np.sqrt(1 + 1e-5))

  t = torch.tensor(x).permute(0, 3, 1, 2)
  feats = conv_module(conv_module(t, "convs.0", 2, 2), "convs.1", 2, 2)
  feats = conv_module(torch.cat([t, feats], 1), "conv_cat", 1, 1)
  want = F.conv2d(feats, sd["conv_seg.weight"], sd["conv_seg.bias"])
  np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), atol=1e-12)


def test_cross_entropy_divides_by_all_pixels():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((2, 5, 4, 3))
  labels = rng.integers(0, 3, (2, 5, 4))
  labels[0, :2] = 255
  with precision(np.float64):
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  total = torch.nn.functional.cross_entropy(torch.tensor(logits).permute(0, 3, 1, 2),
                                            torch.tensor(labels), ignore_index=255,
                                            reduction="sum")
  np.testing.assert_allclose(got, total.item() / labels.size, rtol=1e-12)


def test_train_mode_batch_statistics_and_dropout2d():
  head = models.FCNHead(in_channels=8, channels=6, num_classes=3, in_index=0, num_convs=1,
                        concat_input=False, dropout_ratio=0.5, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 5, 4, 8)), jnp.float32)
  assert head.dropout.deterministic and head.convs[0].bn.use_running_average  # starts in eval
  np.testing.assert_array_equal(head([x]), head([x]))
  bn = head.convs[0].bn
  y = np.asarray(head.convs[0].conv(x), np.float64).reshape(-1, 6)
  head.train()
  head([x])
  # PyTorch's rule: momentum 0.1, the running variance takes the unbiased batch variance.
  np.testing.assert_allclose(bn.running_mean[...], 0.1 * y.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bn.running_var[...], 0.9 + 0.1 * y.var(0, ddof=1), rtol=1e-5)
  assert int(bn.num_batches_tracked[...]) == 1
  # Dropout2d: whole channels of a sample dropped, the kept ones scaled by 1/(1-p).
  dropped = np.asarray(head.dropout(jnp.ones((4, 3, 5, 16))))
  assert np.all(dropped == dropped[:, :1, :1, :])
  assert set(np.unique(dropped)) == {0.0, 2.0}


def test_segmentor_train_mode_loss():
  seg = _mini_segmentor(jnp.float32)
  images = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(np.random.default_rng(4).integers(0, 7, (2, 32, 32)), jnp.int32)
  seg.train()
  assert not seg.decode_head.dropout.deterministic
  assert not seg.auxiliary_head.convs[0].bn.use_running_average
  step = nnx.jit(lambda m, x, y: m.loss(x, y))
  first, second = step(seg, images, labels), step(seg, images, labels)
  # Dropout2d draws new channel masks each call; the running statistics move each call.
  assert np.isfinite(first["loss"]) and float(first["loss"]) != float(second["loss"])
  np.testing.assert_allclose(first["loss"], first["loss_decode"] + first["loss_aux"],
                             rtol=1e-6)
  assert int(seg.decode_head.bottleneck.bn.num_batches_tracked[...]) == 2
  assert int(seg.auxiliary_head.convs[0].bn.num_batches_tracked[...]) == 2
  assert np.any(np.asarray(seg.decode_head.fpn_bottleneck.bn.running_mean[...]) != 0)


def test_heads_initialise_as_mmseg():
  head = models.FCNHead(in_channels=64, channels=256, num_classes=150, num_convs=1,
                        concat_input=False, rngs=nnx.Rngs(0))
  kernel = np.asarray(head.convs[0].conv.kernel[...])
  # ConvModule: kaiming normal, fan_out (256 * 3 * 3), ReLU gain; no bias (BN follows).
  np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (256 * 9)), rtol=0.02)
  assert head.convs[0].conv.bias is None
  np.testing.assert_array_equal(head.convs[0].bn.weight[...], np.ones(256))
  np.testing.assert_array_equal(head.convs[0].bn.bias[...], np.zeros(256))
  # conv_seg: normal std 0.01, zero bias.
  np.testing.assert_allclose(np.asarray(head.conv_seg.kernel[...]).std(), 0.01, rtol=0.05)
  np.testing.assert_array_equal(head.conv_seg.bias[...], np.zeros(150))


def test_bad_options_and_inputs():
  kw = dict(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown segmentor"):
    models.create_segmentor("upernet_internimage_q")
  with pytest.raises(ValueError, match="follow the backbone"):
    models.create_segmentor(backbone=MINI_BACKBONE, decode_head=dict(in_channels=[1, 2, 3, 4]))
  with pytest.raises(ValueError, match="dict of options or False"):
    models.create_segmentor(backbone=MINI_BACKBONE, auxiliary_head=True)
  with pytest.raises(ValueError, match="not an option of the segmentation backbone"):
    models.create_segmentor(backbone=dict(MINI_BACKBONE, num_classes=10))
  with pytest.raises(ValueError, match="features_only has no classification head"):
    models.create("internimage_t", features_only=True, num_classes=10)
  backbone = nnx.eval_shape(lambda: models.create("internimage_h", features_only=True))
  assert backbone.num_classes == 0 and not backbone.use_clip_projector  # no classifier
  with pytest.raises(ValueError, match="num_classes must be >= 1"):
    models.UperHead(in_channels=[4, 8], channels=4, num_classes=0, **kw)
  with pytest.raises(ValueError, match="align_corners"):
    models.UperHead(in_channels=[4, 8], channels=4, num_classes=2, align_corners=True, **kw)
  with pytest.raises(ValueError, match="dropout_ratio"):
    models.FCNHead(in_channels=4, channels=4, num_classes=2, dropout_ratio=1.0, **kw)
  with pytest.raises(ValueError, match="num_convs=0 needs in_channels == channels"):
    models.FCNHead(in_channels=8, channels=4, num_classes=2, num_convs=0, **kw)
  head = models.UperHead(in_channels=[4, 8], channels=4, num_classes=2, **kw)
  maps = [jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, 2, 2, 8))]
  assert head(maps).shape == (1, 4, 4, 2)
  with pytest.raises(ValueError, match="expected 2 maps, got 1"):
    head(maps[:1])
  with pytest.raises(ValueError, match="map 1 must be NHWC with 8 channels"):
    head([maps[0], jnp.zeros((1, 8, 2, 2))])
  fcn = models.FCNHead(in_channels=8, channels=4, num_classes=2, in_index=1, **kw)
  with pytest.raises(ValueError, match="reads map 1, got 1 maps"):
    fcn(maps[:1])
  seg = _mini_segmentor(jnp.float32)
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match="NHWC images"):
    seg(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="labels must be"):
    seg.loss(images, jnp.zeros((1, 16, 32), jnp.int32))
  with pytest.raises(ValueError, match="labels must be integers"):
    seg.loss(images, jnp.zeros((1, 32, 32)))
