"""The training loop: sharded init and step, evaluation, checkpoints, metrics.

State layout: ``{"params", "batch_stats", "opt_state", "step"}``, placed by the FSDP
rule over the mesh (``sharding.py``). The step is ``jax.jit`` with explicit in/out
shardings and the state donated. Randomness (drop path) is reseeded from
``(seed, step)`` inside the step, so a resumed run draws exactly what an
uninterrupted one would; the data iterator's position is saved with the state.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from ml_collections import ConfigDict

from internimage_jax import models
from internimage_jax.training import data as data_lib
from internimage_jax.training import optim, sharding


class TrainingError(RuntimeError):
  """A run that cannot go on (bad configuration, non-finite loss, bad checkpoint)."""


class MetricsWriter:
  """``metrics.jsonl`` (one JSON object per line with ``step``) and TensorBoard events
  in the workdir, written by process 0."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.tensorboard = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **values}) + "\n")
    for key, value in values.items():
      self.tensorboard.add_scalar(key, value, int(step))
    self.tensorboard.flush()

  def close(self) -> None:
    if self.tensorboard is not None:
      self.tensorboard.close()
      self.tensorboard = None


def _build_model(cfg: ConfigDict, num_classes: int, seed: int) -> models.InternImage:
  return models.create(cfg.model.name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                       **cfg.model.overrides.to_dict())


class Trainer:
  """Builds everything from a config; ``run()`` trains with periodic evaluation."""

  def __init__(self, cfg: ConfigDict, workdir: str | Path):
    self.cfg = cfg
    self.workdir = Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    try:
      self.mesh = sharding.make_mesh(cfg.mesh.to_dict())
    except ValueError as e:
      raise TrainingError(f"config.mesh: {e}") from None
    batch = cfg.train.global_batch
    ways = sharding.batch_size_of(self.mesh)
    if batch % ways:
      raise TrainingError(f"global batch {batch} is not divisible by the {ways}-way "
                          f"data-parallel split of mesh {dict(self.mesh.shape)}")
    if cfg.data.name != "digits":
      raise TrainingError(f"unknown data set {cfg.data.name!r} (this version has 'digits')")
    self.data = data_lib.DigitsData(cfg.data.image_size, cfg.data.test_fraction, cfg.data.split_seed)
    num_classes = self.data.num_classes
    self.steps_per_epoch = len(self.data.train[1]) // batch
    self.total_steps = int(cfg.train.epochs * self.steps_per_epoch)

    self.lr = optim.schedule(cfg.train, batch, self.total_steps, self.steps_per_epoch)
    self.tx = optim.make_optimizer(cfg.train, self.lr)

    def init():
      model = _build_model(cfg, num_classes, cfg.seed)
      # The graph definition is static: the shape-only trace below records it, so the
      # (for large models, slow) construction is traced once for shapes, once for init.
      self.graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
      state = {"params": params, "batch_stats": stats, "opt_state": self.tx.init(params),
               "step": jnp.zeros((), jnp.int32)}
      if cfg.train.ema_decay:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
      return state, rng_state

    # Shapes first, then the sharded init: nothing is allocated unsharded.
    abstract_state, abstract_rng = jax.eval_shape(init)
    self.state_shardings = sharding.state_shardings(abstract_state, self.mesh)
    replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    rng_shardings = jax.tree.map(lambda _: replicated, abstract_rng)
    self._init = jax.jit(init, out_shardings=(self.state_shardings, rng_shardings))
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_shardings)
    batch_sharding = sharding.batch_sharding(self.mesh)
    self._train_step = jax.jit(
        self._step, in_shardings=(self.state_shardings, rng_shardings, batch_sharding,
                                  batch_sharding),
        out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(
        self._evaluate, in_shardings=(self.state_shardings, rng_shardings, batch_sharding,
                                      batch_sharding, batch_sharding),
        out_shardings=replicated)

    self.checkpoints = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.checkpoint.keep, save_interval_steps=cfg.checkpoint.every_steps,
            enable_async_checkpointing=True))
    self.metrics = MetricsWriter(self.workdir)

  # ----------------------------------------------------------------- steps
  def _merge(self, state, rng_state, params_key: str = "params") -> models.InternImage:
    return nnx.merge(self.graphdef, state[params_key], state["batch_stats"], rng_state)

  def _step(self, state, rng_state, images, labels):
    cfg = self.cfg.train
    model = self._merge(state, rng_state)
    nnx.reseed(model, dropout=jax.random.fold_in(jax.random.key(self.cfg.seed), state["step"]))
    model.train()

    def loss_fn(model):
      logits = model(images).astype(jnp.float32)
      targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), cfg.label_smoothing)
      return optax.softmax_cross_entropy(logits, targets).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = {"params": new_params, "batch_stats": nnx.state(model, nnx.BatchStat),
                 "opt_state": opt_state, "step": state["step"] + 1}
    if "ema_params" in state:
      decay = cfg.ema_decay
      new_state["ema_params"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                             state["ema_params"], new_params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": self.lr(state["step"])}
    return new_state, metrics

  def _evaluate(self, state, rng_state, images, labels, valid):
    """Hit counts of the raw weights and, when kept, of their EMA."""
    out = {"count": jnp.sum(valid)}
    for prefix, key in (("eval", "params"), ("eval_ema", "ema_params")):
      if key not in state:
        continue
      model = self._merge(state, rng_state, key)
      model.eval()
      logits = model(images)
      top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
      out[f"{prefix}/top1"] = jnp.sum((top5[:, 0] == labels) & valid)
      out[f"{prefix}/top5"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) & valid)
    return out

  def evaluate(self, state, rng_state) -> dict[str, float]:
    """Top-1 / top-5 on the held-out split as fractions: ``eval/*`` and ``eval_ema/*``."""
    images, labels = self.data.test
    batch = self.cfg.train.global_batch
    totals: dict[str, int] = {}
    for x, y, valid in data_lib.eval_batches(images, labels, batch):
      out = self._eval_step(state, rng_state, *(sharding.global_batch(self.mesh, a)
                                                for a in (x, y, valid)))
      for k, v in out.items():
        totals[k] = totals.get(k, 0) + int(v)
    count = totals.pop("count")
    return {k: v / count for k, v in totals.items()}

  # ------------------------------------------------------------ checkpoints
  def _check_compatible(self, step: int) -> None:
    """Compares the stored array shapes with this config's state before restoring:
    a failed orbax restore leaves background tasks behind, a clear error does not."""
    with ocp.StandardCheckpointer() as reader:
      stored = reader.metadata(self.workdir / "checkpoints" / str(step) / "state")
    stored_shapes = sorted(tuple(m.shape) for m in jax.tree.leaves(stored.item_metadata))
    wanted = sorted(tuple(a.shape) for a in jax.tree.leaves(self.abstract_state))
    if stored_shapes != wanted:
      raise TrainingError(
          f"the checkpoint at step {step} in {self.workdir / 'checkpoints'} does not fit this "
          f"config (it holds {len(stored_shapes)} arrays, this model and optimizer need "
          f"{len(wanted)}, and their shapes differ); use a new --workdir or the old config")

  def _restore(self):
    step = self.checkpoints.latest_step()
    if step is None:
      return None
    self._check_compatible(step)
    try:
      restored = self.checkpoints.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(self.abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise TrainingError(
          f"the checkpoint at step {step} in {self.workdir / 'checkpoints'} does not fit this "
          f"config (a different model or optimizer?); use a new --workdir. ({e})") from e
    return restored["state"], data_lib.IteratorState.from_dict(restored["data"])

  def _save(self, step: int, state, position: data_lib.IteratorState, force: bool = False):
    self.checkpoints.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(position.to_dict())),
        force=force)

  # ------------------------------------------------------------------ init
  def initial_state(self):
    """Sharded fresh state, with ``config.init_from`` weights loaded when given.

    A checkpoint whose head has another class count (fine-tuning) loads everything
    but the head, which keeps its fresh initialisation; any other mismatch is an error.
    """
    state, rng_state = self._init()
    if not self.cfg.init_from:
      return state, rng_state
    from internimage_jax import convert

    model = self._merge(jax.device_get(state), jax.device_get(rng_state))
    try:
      report = convert.load_checkpoint(model, self.cfg.init_from, strict=False)
    except (OSError, ValueError) as e:
      raise TrainingError(f"config.init_from: {e}") from e
    problems = [k for k in report.missing + report.unexpected
                + [m.split(":")[0] for m in report.mismatched] if not k.startswith("head.")]
    if problems:
      raise TrainingError(f"config.init_from {self.cfg.init_from} does not fit the model: "
                          + ", ".join(sorted(problems)[:20]))
    if report.mismatched:
      self._log(f"init_from: head re-initialised ({', '.join(report.mismatched)})")
    state = dict(state, params=nnx.state(model, nnx.Param),
                 batch_stats=nnx.state(model, nnx.BatchStat))
    if "ema_params" in state:
      state["ema_params"] = state["params"]
    state["opt_state"] = self.tx.init(state["params"])
    state = jax.device_put(state, self.state_shardings)
    return state, rng_state

  # -------------------------------------------------------------------- run
  def run(self) -> dict[str, float]:
    """Trains (or, with ``mode="eval"``, evaluates); returns the last evaluation."""
    try:
      return self._run()
    finally:
      self.close()

  def close(self) -> None:
    """Finishes pending checkpoint writes and closes the writers."""
    self.checkpoints.wait_until_finished()
    self.checkpoints.close()
    self.metrics.close()

  def _run(self) -> dict[str, float]:
    cfg = self.cfg
    if cfg.mode not in ("train", "eval"):
      raise TrainingError(f"config.mode must be 'train' or 'eval', got {cfg.mode!r}")
    state, rng_state = self.initial_state()
    position = data_lib.IteratorState()
    resumed = self._restore()  # the workdir's newest checkpoint wins over init_from
    if resumed is not None:
      state, position = resumed
      self._log(f"resumed from step {int(state['step'])} ({self.workdir / 'checkpoints'})")
    if cfg.mode == "eval":
      summary = self.evaluate(state, rng_state)
      self.metrics.write(int(state["step"]), summary)
      self._log("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
      return summary
    start = int(state["step"])
    images, labels = self.data.train
    batches = data_lib.EpochIterator(images, labels, cfg.train.global_batch, cfg.seed, position)
    progress = _Progress(self.total_steps, start, self.steps_per_epoch, cfg.train.global_batch)
    summary = {}
    for step in range(start, self.total_steps):
      x, y = next(batches)
      state, metrics = self._train_step(state, rng_state, sharding.global_batch(self.mesh, x),
                                        sharding.global_batch(self.mesh, y))
      loss = float(metrics["loss"])
      if not math.isfinite(loss):
        self.checkpoints.wait_until_finished()
        raise TrainingError(f"loss became {loss} at step {step + 1}; stopping. The last good "
                            f"checkpoint is step {self.checkpoints.latest_step()}.")
      done = step + 1
      speed = progress.update(done, loss, float(metrics["lr"]))
      if done % cfg.log_every_steps == 0 or done == self.total_steps:
        self.metrics.write(done, {"train/loss": loss, "train/lr": metrics["lr"],
                                  "train/grad_norm": metrics["grad_norm"],
                                  "train/images_per_second": speed})
      if done % cfg.eval_every_steps == 0 or done == self.total_steps:
        summary = self.evaluate(state, rng_state)
        self.metrics.write(done, summary)
        progress.note(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
      self._save(done, state, batches.state, force=done == self.total_steps)
    self.checkpoints.wait_until_finished()
    progress.close()
    if not summary:  # nothing left to train (a finished run started again): report it
      summary = self.evaluate(state, rng_state)
    self._log("done: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
    return summary

  def _log(self, message: str) -> None:
    if jax.process_index() == 0:
      print(message, flush=True)


class _Progress:
  """A tqdm bar on a terminal, log lines otherwise: epoch, step, loss, LR, images/s, ETA."""

  def __init__(self, total: int, start: int, steps_per_epoch: int, batch: int):
    self.total, self.steps_per_epoch, self.batch = total, steps_per_epoch, batch
    self.last_time, self.last_step = time.perf_counter(), start
    self.speed = 0.0
    self.bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float, lr: float) -> float:
    now = time.perf_counter()
    if now > self.last_time:
      self.speed = (step - self.last_step) * self.batch / (now - self.last_time)
    self.last_time, self.last_step = now, step
    epoch = (step - 1) // self.steps_per_epoch + 1
    text = f"epoch {epoch} loss {loss:.4f} lr {lr:.2e} {self.speed:.0f} img/s"
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)
      self.bar.update(1)
    elif jax.process_index() == 0 and (step % 10 == 0 or step == self.total):
      eta = (self.total - step) * self.batch / self.speed if self.speed else float("nan")
      print(f"step {step}/{self.total} {text} eta {eta:.0f}s", flush=True)
    return self.speed

  def note(self, message: str) -> None:
    if self.bar is not None:
      self.bar.write(message)
    elif jax.process_index() == 0:
      print(message, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
