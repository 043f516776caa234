"""InternImage (spec section 3): stem, levels of DCNv3 blocks, and both heads."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from internimage_jax.models.dcnv3 import DCNv3
from internimage_jax.models.layers import (
    MLP, BatchNorm2d, Dtype, DropPath, TorchNamed, conv, gather_param, gelu, layer_norm, linear,
    remat_call, scan_remat)
from internimage_jax.models.stacking import map_params

# Fixed sizes of the H/G clip-projector head in the original.
CLIP_PRETRAIN_DIM = 1024
CLIP_EMBED_DIM = 768
CLIP_HEADS = 16


class Stem(nnx.Module, TorchNamed):
  """conv3x3/2 -> LN -> GELU -> conv3x3/2 -> LN: image to 1/4 resolution."""

  torch_names: ClassVar[dict[str, str]] = {"norm1": "norm1.1", "norm2": "norm2.1"}

  def __init__(self, in_chans: int, out_chans: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv1 = conv(in_chans, out_chans // 2, 3, stride=2, **kw)
    self.norm1 = layer_norm(out_chans // 2, **kw)
    self.conv2 = conv(out_chans // 2, out_chans, 3, stride=2, **kw)
    self.norm2 = layer_norm(out_chans, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm2(self.conv2(gelu(self.norm1(self.conv1(x)))))


class Downsample(nnx.Module, TorchNamed):
  """conv3x3/2 without bias (C -> 2C) -> LN."""

  torch_names: ClassVar[dict[str, str]] = {"norm": "norm.1"}

  def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv = conv(channels, 2 * channels, 3, stride=2, use_bias=False, **kw)
    self.norm = layer_norm(2 * channels, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.norm(self.conv(x))


class Block(nnx.Module, TorchNamed):
  """One InternImage layer: a DCNv3 branch and an MLP branch, each residual."""

  torch_names: ClassVar[dict[str, str]] = {
      "norm1": "norm1.0", "norm2": "norm2.0",
      "res_post_norm1": "res_post_norm1.0", "res_post_norm2": "res_post_norm2.0"}

  def __init__(
      self, channels: int, group: int, *, mlp_ratio: float, drop: float, drop_path: float,
      post_norm: bool, layer_scale: float | None, offset_scale: float,
      dw_kernel_size: int | None, res_post_norm: bool, center_feature_scale: bool,
      remove_center: bool, implementation: str, dtype: Dtype, param_dtype: Dtype,
      rngs: nnx.Rngs, always_drop_stream: bool = False, remat_branches: bool = False,
      activation_sharding: jax.sharding.NamedSharding | None = None):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_norm = post_norm
    # Rematerialise each residual branch on its own (inside a rematerialised block):
    # the backward pass then holds one branch's intermediates at a time, not both.
    self.remat_branches = remat_branches
    self.res_post_norm = res_post_norm
    self.norm1 = layer_norm(channels, **kw)
    self.dcn = DCNv3(channels=channels, group=group, kernel_size=3, dw_kernel_size=dw_kernel_size,
                     offset_scale=offset_scale, center_feature_scale=center_feature_scale,
                     remove_center=remove_center, implementation=implementation,
                     activation_sharding=activation_sharding, **kw)
    self.norm2 = layer_norm(channels, **kw)
    self.mlp = MLP(channels, int(channels * mlp_ratio), drop=drop, **kw)
    self.drop_path = DropPath(drop_path, rngs=rngs, always_stream=always_drop_stream)
    self.layer_scale = layer_scale is not None
    if self.layer_scale:
      self.gamma1 = nnx.Param(jnp.full((channels,), layer_scale, param_dtype))
      self.gamma2 = nnx.Param(jnp.full((channels,), layer_scale, param_dtype))
    if res_post_norm:
      self.res_post_norm1 = layer_norm(channels, **kw)
      self.res_post_norm2 = layer_norm(channels, **kw)

  def __call__(self, x: jax.Array, drop_path_keep: jax.Array | None = None) -> jax.Array:
    """``drop_path_keep`` (traced, from a scanned level) replaces ``1 - drop_path``."""
    branch = functools.partial(_residual_branch, post_norm=self.post_norm,
                               res_post_norm=self.res_post_norm)
    for i, fn, norm in ((1, self.dcn, self.norm1), (2, self.mlp, self.norm2)):
      modules = (fn, norm, getattr(self, f"res_post_norm{i}", None), self.drop_path)
      gamma = getattr(self, f"gamma{i}")[...] if self.layer_scale else None
      if self.remat_branches:
        # Only this branch's parameters are inputs: the other's get no zero gradient.
        x = remat_call(branch, modules, x, gamma, drop_path_keep)
      else:
        x = branch(modules, x, gamma, drop_path_keep)
    return x


def _residual_branch(modules, x: jax.Array, gamma: jax.Array | None,
                     drop_path_keep: jax.Array | None, *, post_norm: bool,
                     res_post_norm: bool) -> jax.Array:
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
    y = gamma * y
  return x + drop_path(y, drop_path_keep)


# Rematerialisation of each block in the backward pass (``remat=`` of InternImage):
# "none" keeps every activation; "block" keeps only the blocks' inputs (the least
# memory, one extra forward); "dots" also keeps matmul outputs without batch dims.
REMAT_POLICIES = {
    "block": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _call_block(block: "Block", x: jax.Array) -> jax.Array:
  return block(x)


def _stack(trees: Sequence, shape: tuple[int, ...]):
  """Stacks identically structured pytrees leafwise into leading dims ``shape``."""
  return jax.tree.map(lambda *xs: jnp.stack(xs).reshape(*shape, *xs[0].shape), *trees)


def _param_gatherer(param_sharding):
  """``(names, array) -> array`` placing a parameter as ``param_sharding.at_use`` says
  for its use (replicated, or split for tensor parallelism), its gradient back where
  the state keeps it (reduce-scattered): the FSDP all-gather at use, which also keeps
  XLA from sharding activations by channel to meet a sharded kernel. None without
  ``param_sharding``."""
  if param_sharding is None:
    return None

  def gather(names, a):
    return gather_param(a, param_sharding.at_use(a.shape, names), param_sharding(a.shape, names))

  return gather


def _level_tail(tail, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A level's norm, then its downsample (either may be ``None``)."""
  norm, downsample = tail
  if norm is not None:
    x = norm(x)
  return x, (downsample(x) if downsample is not None else x)


class Level(nnx.Module, TorchNamed):
  """A stage of blocks, its optional post-norms and final norm, then a downsample.

  With ``scan_blocks`` the blocks run as a ``lax.scan`` over their parameters stacked
  on the fly (the parameters stay one module per block, so names, checkpoints and
  optimizer state are the same either way): one block is compiled per level instead
  of ``depth``, and with ``remat`` each block's recomputation happens inside the
  backward loop, where XLA cannot schedule all of them ahead of the backward pass as
  it does with unrolled blocks. Level-2 post-norms (every 6 blocks in H and G) are a
  per-step flag with the norm's parameters (``lax.cond``), so each level is one scan.
  """

  torch_names: ClassVar[dict[str, str]] = {"norm": "norm.0", "post_norms": "post_norms.{}.0"}

  def __init__(
      self, channels: int, depth: int, group: int, *, drop_path: Sequence[float],
      downsample: bool, post_norm: bool, center_feature_scale: bool,
      post_norm_block_ids: Sequence[int] | None, dtype: Dtype, param_dtype: Dtype,
      rngs: nnx.Rngs, remat: str = "none", scan_blocks: bool = False,
      activation_sharding=None, param_sharding=None, **block_options):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.scan_blocks = scan_blocks
    self.activation_sharding = activation_sharding
    self.param_sharding = param_sharding
    self.drop_path_rates = tuple(float(r) for r in drop_path[:depth])
    # Scanned blocks must hold the same state: a rate-0 block keeps a stream too.
    always_stream = scan_blocks and any(r > 0 for r in self.drop_path_rates)
    self.blocks = nnx.List([
        Block(channels, group, drop_path=drop_path[i], post_norm=post_norm,
              center_feature_scale=center_feature_scale, always_drop_stream=always_stream,
              remat_branches=remat == "block", activation_sharding=activation_sharding,
              **block_options, **kw)
        for i in range(depth)])
    # The original skips the level norm for post-norm models, except with
    # center_feature_scale (G is post-norm and keeps it).
    self.has_norm = not post_norm or center_feature_scale
    self.norm = layer_norm(channels, **kw) if self.has_norm else None
    self.post_norm_block_ids = tuple(post_norm_block_ids or ())
    if self.post_norm_block_ids:
      self.post_norms = nnx.List([layer_norm(channels, **kw) for _ in self.post_norm_block_ids])
    self.downsample = Downsample(channels, **kw) if downsample else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns ``(features before downsampling, input of the next level)``."""
    if self.scan_blocks:
      x = self._scanned_blocks(x)
    else:
      if self.remat == "block":
        call = lambda block, x: remat_call(_call_block, block, x)
      elif self.remat == "none":
        call = _call_block
      else:
        call = nnx.remat(_call_block, policy=REMAT_POLICIES[self.remat])
      for i, block in enumerate(self.blocks):
        x = self._constrain(call(block, x))
        if i in self.post_norm_block_ids:
          x = self.post_norms[self.post_norm_block_ids.index(i)](x)
    return remat_call(_level_tail, (self.norm, self.downsample), x,
                      remat=self.remat == "block",
                      params=_param_gatherer(self.param_sharding))

  def _constrain(self, x: jax.Array) -> jax.Array:
    if self.activation_sharding is None:
      return x
    # Keep activations split over the batch: with parameters sharded (FSDP), XLA
    # could otherwise reshard activations by channel instead of gathering weights.
    return jax.lax.with_sharding_constraint(x, self.activation_sharding)

  def _gather_params(self, module: nnx.Module) -> None:
    """Replicates a scanned block's parameters (slices of the stacked ones) where it
    runs: with FSDP each block gathers its own weights, one block at a time."""
    gather = _param_gatherer(self.param_sharding)
    if gather is not None:
      nnx.update(module, map_params(gather, nnx.state(module, nnx.Param)))

  def _stack_params(self, states: list, shape: tuple[int, ...]):
    """The blocks' states stacked into leading dims ``shape``, parameters keeping the
    placement of the unstacked ones (XLA would otherwise gather them whole)."""
    stacked = _stack(states, shape)
    if self.param_sharding is None:
      return stacked

    def place(names, a):
      sharding = self.param_sharding(a.shape[len(shape):], names)
      spec = (None,) * len(shape) + tuple(sharding.spec)
      return jax.lax.with_sharding_constraint(
          a, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec)))

    params, rest = nnx.split_state(stacked, nnx.Param, ...)
    return nnx.merge_state(map_params(place, params), rest)

  def _scanned_blocks(self, x: jax.Array) -> jax.Array:
    blocks = list(self.blocks)
    graphdef = nnx.graphdef(blocks[0])
    states = [nnx.state(b) for b in blocks]
    structure = jax.tree.structure(states[0])
    for i, state in enumerate(states):
      if jax.tree.structure(state) != structure:
        raise ValueError(f"scan_blocks: block {i} holds other state than block 0 "
                         f"({jax.tree.structure(state)} vs {structure})")
    depth = len(blocks)
    stacked = self._stack_params(states, (depth,))
    rates = np.asarray(self.drop_path_rates)
    use_rates = bool(np.any(rates > 0))
    # Keep probabilities rounded once from float64, as the unrolled blocks' Python floats.
    keeps = jnp.asarray(1.0 - rates, dtype=float)
    xs = (stacked, keeps)
    has_post = bool(self.post_norm_block_ids)
    if has_post:
      # A level-2 post-norm after some blocks: every step carries a flag and a norm's
      # parameters (zeros where the flag is off, and then unused).
      post_def = nnx.graphdef(self.post_norms[0])
      post_states = [nnx.state(p) for p in self.post_norms]
      zeros = jax.tree.map(jnp.zeros_like, post_states[0])
      post_of = {b: k for k, b in enumerate(self.post_norm_block_ids)}
      xs += (jnp.asarray([i in post_of for i in range(depth)]),
             _stack([post_states[post_of[i]] if i in post_of else zeros
                     for i in range(depth)], (depth,)))

    def step(x, xs_i):
      state, keep = xs_i[:2]
      block = nnx.merge(graphdef, state)
      self._gather_params(block)
      x = self._constrain(block(x, keep if use_rates else None))
      if has_post:
        flag, post_state = xs_i[2:]
        x = jax.lax.cond(flag, lambda x: nnx.merge(post_def, post_state)(x), lambda x: x, x)
      return x, nnx.state(block, nnx.Not(nnx.Param))  # RNG counts

    if self.remat == "block":
      x, rest = scan_remat(step, x, xs)  # keeps only each block's input
    else:
      if self.remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[self.remat])
      x, rest = jax.lax.scan(step, x, xs)
    for i, block in enumerate(blocks):
      nnx.update(block, jax.tree.map(lambda a: a[i], rest))
    return x


class CrossAttention(nnx.Module, TorchNamed):
  """Multi-head attention with separate q/k/v biases (the original's ``cross_dcn``)."""

  def __init__(self, dim: int, num_heads: int, out_dim: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.q = linear(dim, dim, use_bias=False, **kw)
    self.k = linear(dim, dim, use_bias=False, **kw)
    self.v = linear(dim, dim, use_bias=False, **kw)
    self.q_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.k_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.v_bias = nnx.Param(jnp.zeros((dim,), param_dtype))
    self.proj = linear(dim, out_dim, **kw)

  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    b, nq, dim = q.shape
    heads = self.num_heads
    head_dim = dim // heads

    def split(t, layer, bias):
      t = layer(t)
      t = t + bias[...].astype(t.dtype)
      return t.reshape(b, t.shape[1], heads, head_dim)

    q, k, v = split(q, self.q, self.q_bias), split(k, self.k, self.k_bias), split(v, self.v, self.v_bias)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
    attn = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, nq, dim)
    return self.proj(out)


class AttentionPooling(nnx.Module, TorchNamed):
  """Pools tokens with one query (their mean): the original's ``clip_projector``."""

  torch_names: ClassVar[dict[str, str]] = {
      "norm1_q": "norm1_q.0", "norm1_k": "norm1_k.0", "norm1_v": "norm1_v.0"}

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


class InternImage(nnx.Module, TorchNamed):
  """InternImage on NHWC images; ``forward_features`` gives the four level outputs.

  A new model is in evaluation mode; ``model.train()`` turns on drop path, dropout
  and batch statistics, ``model.eval()`` turns them off again.

  Training options. ``remat`` ("none", "block", "dots") rematerialises in the backward
  pass: "block" keeps only each block's input (and the stem's), recomputing each
  residual branch on its own; "dots" keeps matmul outputs too. ``scan_blocks`` runs
  each level's blocks as a scan over their stacked parameters (same parameters,
  names and results; one compiled block per level); ``None`` means on when training
  is set up for it (``remat`` other than "none", or an ``activation_sharding``).
  ``activation_sharding`` (e.g. batch-sharded over a mesh) is imposed on every
  block's output; ``param_sharding`` (a ``training.sharding.ParamSharding``: where
  the state keeps each parameter and where it is used, by shape and name) lets blocks
  gather their parameters at use, one block at a time, the MLP and clip-projector
  linears staying split over a ``model`` mesh axis (tensor parallelism).
  """

  torch_names: ClassVar[dict[str, str]] = {
      "conv_head": "conv_head.0", "head_norm": "conv_head.1.0",
      "dcnv3_head_x4": "dcnv3_head_x4.0", "fc_norm": "fc_norm.0"}

  def __init__(
      self,
      *,
      channels: int,
      depths: Sequence[int],
      groups: Sequence[int],
      num_classes: int = 1000,
      mlp_ratio: float = 4.0,
      drop_rate: float = 0.0,
      drop_path_rate: float = 0.0,
      layer_scale: float | None = None,
      offset_scale: float = 1.0,
      post_norm: bool = False,
      cls_scale: float = 1.5,
      dw_kernel_size: int | None = None,
      use_clip_projector: bool = False,
      level2_post_norm: bool = False,
      level2_post_norm_block_ids: Sequence[int] | None = None,
      res_post_norm: bool = False,
      center_feature_scale: bool = False,
      remove_center: bool = False,
      in_chans: int = 3,
      implementation: str = "auto",
      remat: str = "none",
      scan_blocks: bool | None = None,
      activation_sharding: jax.sharding.Sharding | None = None,
      param_sharding=None,
      dtype: Dtype = None,
      param_dtype: Dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    depths, groups = tuple(depths), tuple(groups)
    if remat != "none" and remat not in REMAT_POLICIES:
      raise ValueError(f"InternImage: remat must be 'none' or one of {sorted(REMAT_POLICIES)}, "
                       f"got {remat!r}")
    if len(depths) != 4 or len(groups) != 4:
      raise ValueError(f"InternImage: depths and groups need 4 entries, got {depths}, {groups}")
    if channels < 1 or any(d < 1 for d in depths):
      raise ValueError(f"InternImage: channels and depths must be positive, got {channels}, {depths}")
    for i, g in enumerate(groups):
      if g < 1 or (channels << i) % g:
        raise ValueError(
            f"InternImage: level {i} has {channels << i} channels, not divisible by its "
            f"{g} groups")
    if res_post_norm and (post_norm or layer_scale is not None):
      raise ValueError(
          "InternImage: res_post_norm cannot be combined with post_norm or layer_scale "
          "(the original silently ignores it then)")
    if level2_post_norm:
      if not level2_post_norm_block_ids:
        raise ValueError("InternImage: level2_post_norm needs level2_post_norm_block_ids")
      bad = [i for i in level2_post_norm_block_ids if not 0 <= i < depths[2]]
      if bad:
        raise ValueError(
            f"InternImage: level2_post_norm_block_ids {bad} out of range for level 2 depth "
            f"{depths[2]}")
    if not 0.0 <= drop_rate < 1.0 or not 0.0 <= drop_path_rate < 1.0:
      raise ValueError(
          f"InternImage: drop_rate and drop_path_rate must be in [0, 1), got {drop_rate}, "
          f"{drop_path_rate}")
    if num_classes < 0:
      raise ValueError(f"InternImage: num_classes must be >= 0, got {num_classes}")

    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.channels, self.depths, self.groups = channels, depths, groups
    self.in_chans = in_chans
    self.remat = remat
    self.param_sharding = param_sharding
    self.num_classes = num_classes
    self.use_clip_projector = use_clip_projector
    self.num_features = channels * 8

    self.patch_embed = Stem(in_chans, channels, **kw)
    self.pos_drop = nnx.Dropout(drop_rate, rngs=rngs)
    # Stochastic depth rises linearly over all blocks of the network.
    dpr = np.linspace(0.0, drop_path_rate, sum(depths)).tolist()
    starts = np.cumsum((0,) + depths).tolist()
    self.levels = nnx.List([
        Level(
            channels << i, depths[i], groups[i], drop_path=dpr[starts[i]:starts[i + 1]],
            downsample=i < 3, post_norm=post_norm, center_feature_scale=center_feature_scale,
            post_norm_block_ids=level2_post_norm_block_ids if (level2_post_norm and i == 2) else None,
            mlp_ratio=mlp_ratio, drop=drop_rate, layer_scale=layer_scale,
            offset_scale=offset_scale, dw_kernel_size=dw_kernel_size,
            res_post_norm=res_post_norm, remove_center=remove_center,
            implementation=implementation, remat=remat,
            scan_blocks=(remat != "none" or activation_sharding is not None)
            if scan_blocks is None else bool(scan_blocks),
            activation_sharding=activation_sharding, param_sharding=param_sharding, **kw)
        for i in range(4)])

    if not use_clip_projector:
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
                   params=_param_gatherer(self.param_sharding))
    x = self.pos_drop(x)
    features = []
    for level in self.levels:
      feature, x = level(x)
      features.append(feature)
    return features

  def pre_logits(self, x: jax.Array) -> jax.Array:
    """The pooled embedding that the classifier ``head`` reads."""
    features = self.forward_features(x)
    if not self.use_clip_projector:
      head = (self.conv_head, self.head_norm)
      pool, inputs = _conv_pool, (features[3],)
    else:
      head = (self.dcnv3_head_x4, self.dcnv3_head_x3, self.clip_projector, self.fc_norm)
      pool, inputs = _clip_pool, (features[2], features[3])
    return remat_call(pool, head, *inputs, remat=self.remat == "block",
                      params=_param_gatherer(self.param_sharding))

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits ``[N, num_classes]`` (the pooled embedding when ``num_classes == 0``)."""
    y = self.pre_logits(x)
    if self.head is None:
      return y
    return remat_call(nnx.Linear.__call__, self.head, y, remat=False,
                      params=_param_gatherer(self.param_sharding))
