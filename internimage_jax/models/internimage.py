"""InternImage (spec section 3): stem, levels of DCNv3 blocks, and both heads.

A level's blocks are one module, every parameter stacked along a leading ``layers``
axis (``nnx.vmap``), run as one scan: one block compiles per level whatever its depth,
and the optimizer, EMA and checkpoints see one array per parameter kind and level.
Official per-block names exist only in ``convert.py``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.layers import (
    MLP, BatchNorm2d, Dtype, DropPath, conv, gelu, layer_norm, linear)
from internimage_jax.models.partitioning import LAYERS, Placement, param
from internimage_jax.models.remat import remat_call, scan_remat

# Fixed sizes of the H/G clip-projector head in the original.
CLIP_PRETRAIN_DIM = 1024
CLIP_EMBED_DIM = 768
CLIP_HEADS = 16

# What each block keeps for the backward pass (``remat=``): "none" every activation;
# "block" only its input (and the stem's, each level tail's and the head's: the least
# memory, one extra forward); "dots" also the matmul outputs without batch dimensions.
REMAT = ("none", "block", "dots")


class Stem(nnx.Module):
  """conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN: image to 1/4 resolution."""

  def __init__(self, in_chans: int, out_chans: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv(in_chans, out_chans // 2, 3, stride=2, **kw)
    self.norm1 = layer_norm(out_chans // 2, **kw)
    self.conv2 = conv(out_chans // 2, out_chans, 3, stride=2, **kw)
    self.norm2 = layer_norm(out_chans, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm2(self.conv2(gelu(self.norm1(self.conv1(x)))))


class Downsample(nnx.Module):
  """conv3x3/2 without bias (C -> 2C) -> LN."""

  def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = conv(channels, 2 * channels, 3, stride=2, use_bias=False, **kw)
    self.norm = layer_norm(2 * channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class Block(nnx.Module):
  """One InternImage layer: a DCNv3 branch and an MLP branch, each residual;
  ``dcn_options`` go to :class:`DCNv3`."""

  def __init__(
      self, channels: int, group: int, *, mlp_ratio: float, drop: float, drop_path: bool,
      post_norm: bool, layer_scale: float | None, res_post_norm: bool, remat_branches: bool,
      dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, **dcn_options):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_norm = post_norm
    # Rematerialise each residual branch on its own (inside a rematerialised block):
    # the backward pass then holds one branch's intermediates at a time, not both.
    self.remat_branches = remat_branches
    self.res_post_norm = res_post_norm
    self.norm1 = layer_norm(channels, **kw)
    self.dcn = DCNv3(channels=channels, group=group, kernel_size=3, **dcn_options, **kw)
    self.norm2 = layer_norm(channels, **kw)
    self.mlp = MLP(channels, int(channels * mlp_ratio), drop=drop, **kw)
    self.drop_path = DropPath(rngs=rngs if drop_path else None)
    self.layer_scale = layer_scale is not None
    if self.layer_scale:
      self.gamma1 = param(jnp.full((channels,), layer_scale, param_dtype), None)
      self.gamma2 = param(jnp.full((channels,), layer_scale, param_dtype), None)
    if res_post_norm:
      self.res_post_norm1 = layer_norm(channels, **kw)
      self.res_post_norm2 = layer_norm(channels, **kw)

  def __call__(self, x: jax.Array, keep: jax.Array | None = None) -> jax.Array:
    """``keep``: this block's drop-path keep probability (None: none)."""
    branch = functools.partial(_residual_branch, post_norm=self.post_norm,
                               res_post_norm=self.res_post_norm)
    for i, fn, norm in ((1, self.dcn, self.norm1), (2, self.mlp, self.norm2)):
      modules = (fn, norm, getattr(self, f"res_post_norm{i}", None), self.drop_path)
      gamma = getattr(self, f"gamma{i}")[...] if self.layer_scale else None
      if self.remat_branches:
        # Only this branch's parameters are inputs: the other's get no zero gradient.
        x = remat_call(branch, modules, x, gamma, keep)
      else:
        x = branch(modules, x, gamma, keep)
    return x


def _residual_branch(modules, x: jax.Array, gamma: jax.Array | None, keep: jax.Array | None,
                     *, post_norm: bool, res_post_norm: bool) -> jax.Array:
  """One residual branch of a block in the variant's norm placement (spec section 3):
  ``modules`` is ``(fn, norm, res_post_norm or None, drop_path)``."""
  fn, norm, post, drop_path = modules
  if post_norm:
    y = norm(fn(x))
  else:
    y = fn(norm(x))
    if res_post_norm:
      y = post(y)
  if gamma is not None:
    y = gamma.astype(y.dtype) * y  # a float32 scale must not promote bfloat16 activations
  return x + drop_path(y, keep)


def stacked(count: int, build: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
  """``count`` modules as one, every parameter stacked along a leading ``layers`` axis:
  each kind drawn once (vmapped), each layer from its own split of ``rngs``."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=LAYERS)
  def build_all(rngs: nnx.Rngs) -> nnx.Module:
    return build(rngs)

  return build_all(rngs)


def _level_tail(tail, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A level's norm, then its downsample (either may be ``None``)."""
  norm, downsample = tail
  if norm is not None:
    x = norm(x)
  return x, (downsample(x) if downsample is not None else x)


class Level(nnx.Module):
  """A stage of blocks (one stacked module, run as a scan), its norm, then a downsample.

  H's and G's level-2 post-norms (after every sixth block) are data too: stacked, and
  each step of the scan takes a flag and its norm's parameters (gathered by index).
  """

  def __init__(
      self, channels: int, depth: int, group: int, *, drop_path: Sequence[float],
      downsample: bool, post_norm: bool, center_feature_scale: bool,
      post_norm_block_ids: Sequence[int], remat: str, placement: Placement,
      dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs, **block_options):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat, self.placement = remat, placement
    rates = tuple(float(r) for r in drop_path[:depth])
    self.keep = tuple(1.0 - r for r in rates) if any(rates) else None
    block_options.update(
        drop_path=self.keep is not None, post_norm=post_norm, remat_branches=remat == "block",
        center_feature_scale=center_feature_scale, dtype=dtype, param_dtype=param_dtype,
        activation_sharding=placement.activations)
    self.blocks = stacked(depth, lambda rngs: Block(channels, group, rngs=rngs,
                                                    **block_options), rngs)
    # The original skips the level norm for post-norm models, except with
    # center_feature_scale (G is post-norm and keeps it).
    self.norm = layer_norm(channels, **kw) if not post_norm or center_feature_scale else None
    ids = tuple(post_norm_block_ids)
    self.post_norm_of = tuple(ids.index(i) if i in ids else -1 for i in range(depth))
    if ids:
      self.post_norms = stacked(len(ids), lambda rngs: layer_norm(
          channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs), rngs)
    self.downsample = Downsample(channels, **kw) if downsample else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(features before downsampling, input of the next level)``."""
    graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
    xs = {"params": params, "rest": rest}
    if self.keep is not None:
      # Rounded once from float64, as Python floats would be.
      xs["keep"] = jnp.asarray(self.keep, dtype=float)
    index = np.asarray(self.post_norm_of)
    if (index >= 0).any():
      post_def, post = nnx.split(self.post_norms)
      xs["post"] = jax.tree.map(lambda a: a[np.maximum(index, 0)], post)
      xs["has_post"] = jnp.asarray(index >= 0)

    def step(x, xs):
      block = nnx.merge(graphdef, self.placement.gather(xs["params"]), xs["rest"])
      x = self.placement.constrain(block(x, xs.get("keep")))
      if "post" in xs:
        norm = nnx.merge(post_def, self.placement.gather(xs["post"]))
        x = jax.lax.cond(xs["has_post"], norm, lambda x: x, x)
      return x, nnx.state(block, nnx.Not(nnx.Param))  # the RNG counts moved

    if self.remat == "block":
      x, rest = scan_remat(step, x, xs)  # keeps only each block's input
    else:
      if self.remat == "dots":
        step = jax.checkpoint(step, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
      x, rest = jax.lax.scan(step, x, xs)
    nnx.update(self.blocks, rest)
    return remat_call(_level_tail, (self.norm, self.downsample), x, remat=self.remat == "block",
                      params=self.placement.gather)


class CrossAttention(nnx.Module):
  """Multi-head attention with separate q/k/v biases (the original's ``cross_dcn``)."""

  def __init__(self, dim: int, num_heads: int, out_dim: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    # Tensor parallelism splits the attention features ("heads") of q, k, v and proj.
    for name in ("q", "k", "v"):
      setattr(self, name, linear(dim, dim, axes=("embed", "heads"), use_bias=False, **kw))
      setattr(self, f"{name}_bias", param(jnp.zeros((dim,), param_dtype), "heads"))
    self.proj = linear(dim, out_dim, axes=("heads", "embed"), **kw)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, nq, dim = q.shape
    head_dim = dim // self.num_heads

    def split(t, layer, bias):
      t = layer(t)
      return (t + bias[...].astype(t.dtype)).reshape(b, t.shape[1], self.num_heads, head_dim)

    q, k, v = split(q, self.q, self.q_bias), split(k, self.k, self.k_bias), split(v, self.v, self.v_bias)
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k), axis=-1)
    return self.proj(jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, nq, dim))


class AttentionPooling(nnx.Module):
  """Pools tokens with one query (their mean): the original's ``clip_projector``."""

  def __init__(self, dim: int, num_heads: int, out_dim: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1_q = layer_norm(dim, **kw)
    self.norm1_k = layer_norm(dim, **kw)
    self.norm1_v = layer_norm(dim, **kw)
    self.cross_dcn = CrossAttention(dim, num_heads, out_dim, **kw)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    query = jnp.mean(tokens, axis=1, keepdims=True)
    out = self.cross_dcn(self.norm1_q(query), self.norm1_k(tokens), self.norm1_v(tokens))
    return out[:, 0]


def pixel_shuffle(x: jax.Array, factor: int) -> jax.Array:
  """``torch.nn.PixelShuffle`` on NHWC: channel ``c*r*r + i*r + j`` -> (c, h*r+i, w*r+j)."""
  n, h, w, c = x.shape
  out_c = c // (factor * factor)
  x = x.reshape(n, h, w, out_c, factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(n, h * factor, w * factor, out_c)


def _conv_pool(head, level3: jax.Array) -> jax.Array:
  """The classification head up to the pooled embedding: conv 1x1, BN, GELU, mean."""
  conv_head, head_norm = head
  return jnp.mean(gelu(head_norm(conv_head(level3))), axis=(1, 2))


def _clip_pool(head, level2: jax.Array, level3: jax.Array) -> jax.Array:
  """The H/G head: level 3 upsampled onto level 2, attention pooling, norm."""
  head_x4, head_x3, clip_projector, fc_norm = head
  y = pixel_shuffle(head_x4(level3), 2) + head_x3(level2)
  tokens = y.reshape(y.shape[0], -1, y.shape[-1])
  return fc_norm(clip_projector(tokens))


class InternImage(nnx.Module):
  """InternImage on NHWC images; ``forward_features`` gives the four level outputs.

  A new model is in evaluation mode; ``model.train()`` turns on drop path, dropout
  and batch statistics, ``model.eval()`` turns them off again. ``features_only``: no
  classification head (the backbone of the segmentation and detection systems).

  Training options. ``remat`` (``REMAT``) is what the backward pass keeps: "block"
  only each block's input, recomputing each residual branch on its own; "dots" the
  matmul outputs too. ``activation_sharding`` (the batch split over a mesh) is imposed
  on every block's output; parameters are then kept as ``axis_rules`` (logical axis ->
  mesh axis, ``partitioning.DEFAULT_RULES`` by default) place them, and each block
  gathers its own for use (FSDP), the tensor-parallel ones staying split.
  """

  def __init__(
      self, *, channels: int, depths: Sequence[int], groups: Sequence[int],
      num_classes: int = 1000, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
      drop_path_rate: float = 0.0, layer_scale: float | None = None, offset_scale: float = 1.0,
      post_norm: bool = False, cls_scale: float = 1.5, dw_kernel_size: int | None = None,
      use_clip_projector: bool = False, level2_post_norm: bool = False,
      level2_post_norm_block_ids: Sequence[int] | None = None, res_post_norm: bool = False,
      center_feature_scale: bool = False, remove_center: bool = False, in_chans: int = 3,
      features_only: bool = False, implementation: str = "auto", remat: str = "none",
      activation_sharding: jax.sharding.NamedSharding | None = None,
      axis_rules: dict[str, str | None] | None = None, dtype: Dtype = None,
      param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    depths, groups = tuple(depths), tuple(groups)
    if len(depths) != 4 or len(groups) != 4:
      raise ValueError(f"InternImage: depths and groups need 4 entries, got {depths}, {groups}")
    ids = tuple(level2_post_norm_block_ids or ()) if level2_post_norm else ()
    problems = [
        (remat not in REMAT, f"remat must be one of {REMAT}, got {remat!r}"),
        (channels < 1 or any(d < 1 for d in depths),
         f"channels and depths must be positive, got {channels}, {depths}"),
        *((g < 1 or (channels << i) % g,
           f"level {i} has {channels << i} channels, not divisible by its {g} groups")
          for i, g in enumerate(groups)),
        (res_post_norm and (post_norm or layer_scale is not None),
         "res_post_norm cannot be combined with post_norm or layer_scale (the original "
         "silently ignores it then)"),
        (level2_post_norm and not ids, "level2_post_norm needs level2_post_norm_block_ids"),
        (any(not 0 <= i < depths[2] for i in ids),
         f"level2_post_norm_block_ids {[i for i in ids if not 0 <= i < depths[2]]} out of range "
         f"for level 2 depth {depths[2]}"),
        (not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0,
         f"drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, {drop_path_rate}"),
        (num_classes < 0, f"num_classes must be >= 0, got {num_classes}"),
        (features_only and (num_classes or use_clip_projector),
         "features_only has no classification head: num_classes must be 0 and "
         "use_clip_projector False")]
    for bad, message in problems:
      if bad:
        raise ValueError(f"InternImage: {message}")

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.channels, self.depths, self.groups, self.in_chans = channels, depths, groups, in_chans
    self.remat, self.num_classes, self.num_features = remat, num_classes, channels * 8
    self.placement = placement = Placement.of(activation_sharding, axis_rules)
    self.use_clip_projector, self.features_only = use_clip_projector, features_only

    self.patch_embed = Stem(in_chans, channels, **kw)
    self.pos_drop = nnx.Dropout(drop_rate, rngs=rngs)
    # Stochastic depth rises linearly over all blocks of the network.
    dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    starts = np.cumsum((0,) + depths).tolist()
    self.levels = nnx.List([
        Level(
            channels << i, depths[i], groups[i], drop_path=dpr[starts[i]:starts[i + 1]],
            downsample=i < 3, post_norm=post_norm, center_feature_scale=center_feature_scale,
            post_norm_block_ids=ids if i == 2 else (),
            mlp_ratio=mlp_ratio, drop=drop_rate, layer_scale=layer_scale,
            offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
            res_post_norm=res_post_norm, remove_center=remove_center,
            implementation=implementation, remat=remat, placement=placement, **kw)
        for i in range(4)])

    if features_only:  # a dense-prediction backbone: the four level maps only
      self.head = None
    elif not use_clip_projector:
      hidden = int(self.num_features * cls_scale)
      self.conv_head = conv(self.num_features, hidden, 1, use_bias=False, **kw)
      self.head_norm = BatchNorm2d(hidden, dtype=dtype, param_dtype=param_dtype)
      head_in = hidden
    else:
      self.dcnv3_head_x4 = conv(self.num_features, CLIP_PRETRAIN_DIM * 4, 1, **kw)
      self.dcnv3_head_x3 = conv(self.num_features // 2, CLIP_PRETRAIN_DIM, 1, **kw)
      self.clip_projector = AttentionPooling(CLIP_PRETRAIN_DIM, CLIP_HEADS, CLIP_EMBED_DIM, **kw)
      self.fc_norm = layer_norm(CLIP_EMBED_DIM, **kw)
      head_in = CLIP_EMBED_DIM
    if not features_only:
      self.head = linear(head_in, num_classes, **kw) if num_classes > 0 else None
    # Start in evaluation mode, as published weights are mostly used for inference;
    # training code calls model.train() (drop path, dropout, batch statistics).
    self.eval()

  def _check_input(self, x: jax.Array) -> None:
    if x.ndim != 4:
      raise ValueError(
          f"InternImage: expected NHWC images [N, H, W, {self.in_chans}], got shape {tuple(x.shape)}")
    if x.shape[-1] != self.in_chans:
      raise ValueError(
          f"InternImage: expected {self.in_chans} input channels (NHWC), got shape "
          f"{tuple(x.shape)}; convert NCHW input with x.transpose(0, 2, 3, 1)")
    if self.use_clip_projector and (x.shape[1] % 32 or x.shape[2] % 32):
      raise ValueError(
          "InternImage: the clip-projector head sums level 2 and upsampled level 3, so the "
          f"image height and width must be multiples of 32, got {x.shape[1]}x{x.shape[2]}")

  def forward_features(self, x: jax.Array) -> list[jax.Array]:
    """The four level outputs (NHWC, before each downsample) for dense heads."""
    self._check_input(x)
    # With remat the stem (at 1/2 resolution) keeps only its input for the backward.
    x = remat_call(Stem.__call__, self.patch_embed, x, remat=self.remat != "none",
                   params=self.placement.gather)
    x = self.pos_drop(x)
    features = []
    for level in self.levels:
      feature, x = level(x)
      features.append(feature)
    return features

  def pre_logits(self, x: jax.Array) -> jax.Array:
    """The pooled embedding that the classifier ``head`` reads."""
    if self.features_only:
      raise ValueError("InternImage: a features_only backbone has no classification head; "
                       "use forward_features")
    features = self.forward_features(x)
    if not self.use_clip_projector:
      head = (self.conv_head, self.head_norm)
      pool, inputs = _conv_pool, (features[3],)
    else:
      head = (self.dcnv3_head_x4, self.dcnv3_head_x3, self.clip_projector, self.fc_norm)
      pool, inputs = _clip_pool, (features[2], features[3])
    return remat_call(pool, head, *inputs, remat=self.remat == "block",
                      params=self.placement.gather)

  def __call__(self, x: jax.Array) -> jax.Array | list[jax.Array]:
    """Logits ``[N, num_classes]`` (the pooled embedding when ``num_classes == 0``; the
    four level maps when ``features_only``)."""
    if self.features_only:
      return self.forward_features(x)
    y = self.pre_logits(x)
    if self.head is None:
      return y
    return remat_call(nnx.Linear.__call__, self.head, y, remat=False,
                      params=self.placement.gather)
