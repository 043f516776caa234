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
  """``metrics.jsonl`` in the workdir (one JSON object per line with ``step``)."""

  def __init__(self, workdir: Path):
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0

  def write(self, step: int, values: dict[str, float]) -> None:
    if self.enabled:
      with self.path.open("a") as f:
        f.write(json.dumps({"step": int(step), **{k: float(v) for k, v in values.items()}}) + "\n")


def _build_model(cfg: ConfigDict, num_classes: int, seed: int) -> models.InternImage:
  return models.create(cfg.model.name, num_classes=num_classes, rngs=nnx.Rngs(seed),
                       **cfg.model.overrides.to_dict())


class Trainer:
  """Builds everything from a config; ``run()`` trains with periodic evaluation."""

  def __init__(self, cfg: ConfigDict, workdir: str | Path):
    self.cfg = cfg
    self.workdir = Path(workdir).absolute()
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.mesh = sharding.make_mesh(cfg.mesh.to_dict())
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

    # Shapes first, then the sharded init: nothing is allocated unsharded.
    abstract = nnx.eval_shape(lambda: _build_model(cfg, num_classes, cfg.seed))
    self.graphdef, _, _, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)
    self.lr = optim.schedule(cfg.train, batch, self.total_steps, self.steps_per_epoch)
    self.tx = optim.make_optimizer(cfg.train, self.lr)

    def init():
      model = _build_model(cfg, num_classes, cfg.seed)
      _, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
      state = {"params": params, "batch_stats": stats, "opt_state": self.tx.init(params),
               "step": jnp.zeros((), jnp.int32)}
      return state, rng_state

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
  def _merge(self, state, rng_state) -> models.InternImage:
    return nnx.merge(self.graphdef, state["params"], state["batch_stats"], rng_state)

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
    new_state = {"params": optax.apply_updates(params, updates),
                 "batch_stats": nnx.state(model, nnx.BatchStat),
                 "opt_state": opt_state, "step": state["step"] + 1}
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": self.lr(state["step"])}
    return new_state, metrics

  def _evaluate(self, state, rng_state, images, labels, valid):
    model = self._merge(state, rng_state)
    model.eval()
    logits = model(images)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    hit1 = (top5[:, 0] == labels) & valid
    hit5 = jnp.any(top5 == labels[:, None], axis=-1) & valid
    return {"top1": jnp.sum(hit1), "top5": jnp.sum(hit5), "count": jnp.sum(valid)}

  def evaluate(self, state, rng_state) -> dict[str, float]:
    images, labels = self.data.test
    batch = self.cfg.train.global_batch
    totals = {"top1": 0, "top5": 0, "count": 0}
    for x, y, valid in data_lib.eval_batches(images, labels, batch):
      out = self._eval_step(state, rng_state, *(sharding.global_batch(self.mesh, a)
                                                for a in (x, y, valid)))
      totals = {k: totals[k] + int(out[k]) for k in totals}
    return {"top1": totals["top1"] / totals["count"], "top5": totals["top5"] / totals["count"]}

  # ------------------------------------------------------------ checkpoints
  def _restore(self):
    step = self.checkpoints.latest_step()
    if step is None:
      return None
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

  # -------------------------------------------------------------------- run
  def run(self) -> dict[str, float]:
    cfg = self.cfg
    state, rng_state = self._init()
    position = data_lib.IteratorState()
    resumed = self._restore()
    if resumed is not None:
      state, position = resumed
      self._log(f"resumed from step {int(state['step'])} ({self.workdir / 'checkpoints'})")
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
        summary = {f"eval/{k}": v for k, v in self.evaluate(state, rng_state).items()}
        self.metrics.write(done, summary)
        progress.note(f"step {done}: held-out top-1 {summary['eval/top1']:.4f}, "
                      f"top-5 {summary['eval/top5']:.4f}")
      self._save(done, state, batches.state, force=done == self.total_steps)
    self.checkpoints.wait_until_finished()
    progress.close()
    if not summary:  # nothing left to train (a finished run started again): report it
      summary = {f"eval/{k}": v for k, v in self.evaluate(state, rng_state).items()}
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
