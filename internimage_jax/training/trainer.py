"""The training loop: sharded init and step, evaluation, checkpoints, metrics.

``TrainProgram`` is everything that depends only on the config (model, optimizer, mesh,
sharded state, the jitted train and eval steps); ``Trainer`` adds data, checkpoints and
metrics. State layout: ``{"params", "batch_stats", "opt_state", "step"[, "ema_params"]}``,
placed over the mesh by the config's logical axis rules (``sharding.py``); a level's
blocks hold their parameters stacked (and so do the optimizer moments and EMA), so the
optimizer compiles the same for any depth.
The step is ``jax.jit`` with explicit in/out shardings and the state donated. All
randomness of a step (drop path, random erasing, mixup/cutmix) comes from ``(seed,
step)``, and host augmentation from ``(seed, example position)``, so a resumed run
draws exactly what an uninterrupted one would; the data iterator's position is saved
with the state.

What keeps work safe (``docs/reliability.md``): one run per workdir (``workdir.py``),
SIGTERM/SIGINT save and stop at a step boundary (``preemption.py``), failed background
saves stop the run at once and damaged steps are skipped on restore (``checkpoints.py``),
and a step whose loss or gradients are not finite is not applied, so no diverged state is
ever saved.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from internimage_jax.training import augment, optim, pipeline, sharding
from internimage_jax.training import config as config_lib
from internimage_jax.training.checkpoints import Checkpoints
from internimage_jax.training.errors import Preempted, TrainingError
from internimage_jax.training.preemption import PreemptionWatch
from internimage_jax.training.processes import Program, everywhere
from internimage_jax.training.tasks import Task, task_class
from internimage_jax.training.workdir import WorkdirLock

__all__ = ["Preempted", "TrainProgram", "Trainer", "TrainingError"]


class MetricsWriter:
  """``metrics.jsonl`` (one JSON object per line with ``step``) and TensorBoard events
  in the workdir, written by process 0.

  ``start(step)`` opens them for a run that begins at ``step``: rows of later steps,
  written by an earlier run after its last checkpoint, are dropped (the resumed run
  writes them again), and TensorBoard is told to purge them too.
  """

  def __init__(self, workdir: Path):
    self.workdir = workdir
    self.path = workdir / "metrics.jsonl"
    self.enabled = jax.process_index() == 0
    self.tensorboard = None

  def start(self, step: int | None = None) -> None:
    """Opens the writers; ``step``: where training resumes (None: keep every row)."""
    if not self.enabled:
      return
    if step is not None and self.path.is_file():
      lines = self.path.read_text().splitlines(keepends=True)
      kept = [line for line in lines if _row_step(line) <= step]
      if len(kept) != len(lines):
        staged = self.path.with_name(self.path.name + ".tmp")
        staged.write_text("".join(kept))
        os.replace(staged, self.path)
    from tensorboardX import SummaryWriter
    self.tensorboard = SummaryWriter(
        str(self.workdir / "tensorboard"), purge_step=None if step is None else step + 1)

  def write(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    if self.tensorboard is None:
      self.start()
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


def _row_step(line: str) -> float:
  try:
    return float(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return float("inf")  # a torn last line of a killed run: dropped


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainProgram:
  """Model, optimizer, mesh, sharded state and the jitted steps of a config (no data).

  The steps take the batch as a dict of global arrays (``task.batch_shapes``; for
  classification ``{"image", "label"}``). ``abstract_state`` and ``abstract_inputs`` let
  a step be lowered and compiled without allocating anything:
  ``program.train_step.lower(*program.abstract_inputs(b)).compile()``, or in the
  background: ``program.train_step.compile_ahead(*program.abstract_inputs())``.
  """

  def __init__(self, cfg: ConfigDict, num_classes: int, steps_per_epoch: int,
               mean=augment.IMAGENET_MEAN, std=augment.IMAGENET_STD,
               class_names: list[str] | None = None):
    try:
      config_lib.validate(cfg)
      self.mesh = sharding.make_mesh(cfg.mesh.to_dict())
    except ValueError as e:
      raise TrainingError(str(e) if "config" in str(e) else f"config.mesh: {e}") from None
    self.cfg, self.num_classes = cfg, num_classes
    self.task: Task = task_class(cfg)(cfg, num_classes, mean, std, class_names)
    batch = cfg.train.global_batch
    ways = sharding.batch_size_of(self.mesh)
    for name, size in (("config.train.global_batch", batch),
                       ("config.data.eval_batch", cfg.data.eval_batch or batch)):
      if size % ways:
        raise TrainingError(f"{name} {size} is not divisible by the {ways}-way "
                            f"data-parallel split of mesh {dict(self.mesh.shape)}")
    self.steps_per_epoch = max(1, steps_per_epoch)
    self.total_steps = cfg.train.steps or int(cfg.train.epochs * self.steps_per_epoch)
    self.lr = optim.schedule(cfg.train, batch, self.total_steps, self.steps_per_epoch)
    self.tx: optax.GradientTransformation | None = None

    def init():
      model = self.build_model()
      if self.tx is None:  # the LR multipliers need the parameter names: set on first trace
        self.tx = optim.make_optimizer(cfg.train, self.lr, self.task.lr_multipliers(model))
      # The graph definition is static: the shape-only trace below records it, so the
      # (for large models, slow) construction is traced once for shapes, once for init.
      self.graphdef, params, stats, rng_state = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
      state = {"params": params, "batch_stats": stats, "opt_state": self.tx.init(params),
               "step": jnp.zeros((), jnp.int32)}
      if cfg.train.ema_decay:
        state["ema_params"] = jax.tree.map(jnp.copy, params)
      return state, rng_state

    # Shapes first, then the sharded init: nothing is allocated unsharded.
    abstract_state, abstract_rng = jax.eval_shape(init)  # options: config.validate
    try:
      self.state_shardings = sharding.state_shardings(abstract_state, self.mesh,
                                                      config_lib.axis_rules(cfg))
    except ValueError as e:
      raise TrainingError(f"config.mesh {dict(self.mesh.shape)} and config.axis_rules: "
                          f"{e}") from None
    self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.rng_shardings = jax.tree.map(lambda _: self.replicated, abstract_rng)
    # Several processes start each program together (processes.py says why).
    self.init = Program(jax.jit(init, out_shardings=(self.state_shardings, self.rng_shardings)),
                        "init")
    self.abstract_state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        abstract_state, self.state_shardings)
    self.abstract_rng = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), abstract_rng)
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.train_step = Program(jax.jit(
        self._step, in_shardings=(self.state_shardings, self.rng_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, self.replicated), donate_argnums=(0,)),
        "train step")
    self.eval_step = Program(jax.jit(
        self._evaluate, in_shardings=(self.state_shardings, self.rng_shardings,
                                      self.batch_sharding),
        out_shardings=self.replicated), "eval step")
    self._all_finite = Program(jax.jit(_all_finite, out_shardings=self.replicated),
                               "finiteness check")

  def all_finite(self, state) -> bool:
    """Whether every floating-point value of ``state`` is finite (checked on device)."""
    return bool(self._all_finite(state))

  def build_model(self, seed: int | None = None) -> nnx.Module:
    cfg = self.cfg
    return self.task.build_model(
        rngs=nnx.Rngs(cfg.seed if seed is None else seed),
        dtype=COMPUTE_DTYPES[cfg.train.compute_dtype],
        activation_sharding=sharding.batch_sharding(self.mesh),
        axis_rules=config_lib.axis_rules(cfg), remat=cfg.model.remat,
        implementation=cfg.model.implementation)

  def abstract_inputs(self, batch: int | None = None):
    """Shape-only ``(state, rng_state, batch)`` for lowering the train step."""
    shapes = self.task.batch_shapes(batch or self.cfg.train.global_batch, train=True)
    arrays = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
              for k, (shape, dtype) in shapes.items()}
    return self.abstract_state, self.abstract_rng, arrays

  def merge(self, state, rng_state, params_key: str = "params") -> nnx.Module:
    """The model of a train state (``params_key``: ``"params"`` or ``"ema_params"``)."""
    return nnx.merge(self.graphdef, state[params_key], state["batch_stats"],
                     rng_state)

  def params_of(self, model: nnx.Module) -> nnx.State:
    """A model's parameters as the train state holds them."""
    return nnx.state(model, nnx.Param)

  # ----------------------------------------------------------------- steps
  def _step(self, state, rng_state, batch):
    cfg = self.cfg.train
    key = jax.random.fold_in(jax.random.key(self.cfg.seed), state["step"])
    aug_key, drop_key = jax.random.split(key)
    prepared = self.task.prepare(aug_key, batch)
    model = self.merge(state, rng_state)
    nnx.reseed(model, dropout=drop_key, policy="match_shape")  # a key per stacked block
    model.train()
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    params = state["params"]

    def loss_fn(params, rest, prepared):
      # Fresh Variables (copy=True) that belong to this trace, so the RNG counts can move.
      model = nnx.merge(graphdef, params, rest, copy=True)
      loss = self.task.loss(model, prepared)
      return loss, nnx.state(model, nnx.Not(nnx.Param))  # new batch stats and RNG counts

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if cfg.accum_steps == 1:
      (loss, rest), grads = grad_fn(params, rest, prepared)
    else:
      # Micro-batch i takes every accum_steps-th example: each device keeps its own
      # examples (the batch is sharded in contiguous blocks), so no data moves.
      def micro(a):
        a = a.reshape(a.shape[0] // cfg.accum_steps, cfg.accum_steps, *a.shape[1:])
        return jnp.moveaxis(a, 1, 0)

      def body(carry, micro_batch):
        grads_sum, loss_sum, rest = carry
        (loss, rest), grads = grad_fn(params, rest, micro_batch)
        return (jax.tree.map(jnp.add, grads_sum, grads), loss_sum + loss, rest), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, loss, rest), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), rest),
                                           jax.tree.map(micro, prepared))
      grads = jax.tree.map(lambda g: g / cfg.accum_steps, grads)
      loss = loss / cfg.accum_steps
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    new_params = optax.apply_updates(params, updates)
    batch_stats = jax.tree.map(lambda new, old: new.astype(old.dtype),
                               rest.filter(nnx.BatchStat), state["batch_stats"])
    new_state = {"params": new_params, "batch_stats": batch_stats,
                 "opt_state": opt_state, "step": state["step"] + 1}
    if "ema_params" in state:
      decay = cfg.ema_decay
      new_state["ema_params"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                             state["ema_params"], new_params)
    grad_norm = optax.tree.norm(grads)
    # A diverged step is not applied: the state stays that of the previous step, so it
    # can never be saved. The flag is known before the update, so each leaf's select
    # fuses into its update and the donated buffers are still updated in place.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr(state["step"]),
               "finite": finite}
    return new_state, metrics

  def _evaluate(self, state, rng_state, batch):
    """The task's counts for the raw weights and, when kept, for their EMA."""
    out = {"count": jnp.sum(batch["valid"]), "unreadable": jnp.sum(batch["unreadable"])}
    for prefix, key in (("eval", "params"), ("eval_ema", "ema_params")):
      if key not in state:
        continue
      model = self.merge(state, rng_state, key)
      model.eval()
      for name, value in self.task.eval_counts(model, batch).items():
        out[f"{prefix}/{name}"] = value
    return out


def _by_prefix(totals: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """``{"eval/top1": v, ...}`` -> ``{"eval": {"top1": v}, ...}``."""
  grouped: dict[str, dict[str, np.ndarray]] = {}
  for key, value in totals.items():
    prefix, name = key.split("/", 1)
    grouped.setdefault(prefix, {})[name] = value
  return grouped


class Trainer:
  """Builds everything from a config; ``run()`` trains with periodic evaluation."""

  def __init__(self, cfg: ConfigDict, workdir: str | Path):
    self.cfg = cfg
    self.workdir = Path(workdir).absolute()
    try:
      self.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise TrainingError(f"cannot create --workdir {self.workdir}: {e.strerror}") from None
    self._batches: pipeline.TrainIterator | None = None
    # From here until close(), SIGTERM / Ctrl-C mean "save at the next step and stop".
    self._preemption = PreemptionWatch().__enter__() if cfg.mode == "train" else None
    self._lock = WorkdirLock(self.workdir)
    try:
      self._take_lock()
      self._build(cfg)
    except BaseException:
      self._release()
      raise

  def _release(self) -> None:
    self._lock.release()
    if self._preemption is not None:
      self._preemption.__exit__(None, None, None)

  def _take_lock(self) -> None:
    """Process 0 takes the workdir's lock; every process learns whether it could."""
    error = None
    if jax.process_index() == 0:
      try:
        warning = self._lock.acquire()
      except TrainingError as e:
        error = e
      except OSError as e:
        error = TrainingError(f"cannot write in --workdir {self.workdir}: {e.strerror}")
      else:
        if warning:
          print(warning, file=sys.stderr, flush=True)
    if not everywhere(error is None, "workdir locked"):
      raise error or TrainingError(f"process 0 could not take the lock of {self.workdir}")

  def _build(self, cfg: ConfigDict) -> None:
    try:
      config_lib.validate(cfg)
      make_source = task_class(cfg).make_source
      self.train_source = make_source(cfg, "train") if cfg.mode == "train" else None
      self.eval_source = make_source(cfg, "eval")
    except (ValueError, ImportError) as e:
      raise TrainingError(str(e)) from None
    data = self.eval_source
    batch = cfg.train.global_batch
    steps_per_epoch = len(self.train_source) // batch if self.train_source else 1
    if self.train_source is not None and steps_per_epoch == 0:
      raise TrainingError(f"global batch {batch} exceeds the {len(self.train_source)} "
                          "training examples")
    self.program = TrainProgram(cfg, data.num_classes, steps_per_epoch, data.mean, data.std,
                                getattr(data, "class_names", None))
    self.task = self.program.task
    try:
      self.task.bind_eval_source(self.eval_source)
    except (ValueError, ImportError) as e:
      raise TrainingError(str(e)) from None
    self._write_model_json()
    self.steps_per_epoch, self.total_steps = self.program.steps_per_epoch, self.program.total_steps
    try:  # a bad augmentation option fails here, before anything is compiled
      self.train_example = self.task.train_example() if cfg.mode == "train" else None
      self.eval_example = self.task.eval_example()
    except ValueError as e:
      raise TrainingError(str(e)) from None
    self.eval_every = cfg.eval_every_steps or self.steps_per_epoch
    self.checkpoints = Checkpoints(
        self.workdir / "checkpoints", keep=cfg.checkpoint.keep,
        every_steps=cfg.checkpoint.every_steps or self.steps_per_epoch)
    self.metrics = MetricsWriter(self.workdir)
    self.last_eval_totals: dict[str, np.ndarray] = {}  # the newest evaluation's counts

  def _write_model_json(self) -> None:
    """What builds the run's model (task, name, classes, options), beside the checkpoints,
    so that ``init_from``, ``predict`` and ``convert`` read them without the config."""
    if jax.process_index() != 0:
      return
    from internimage_jax import convert

    metadata = {"task": self.task.name, "model": self.cfg.model.name,
                "num_classes": self.program.num_classes, "options": self.task.model_options()}
    try:
      convert.write_model_json(self.workdir, metadata)
    except OSError as e:
      raise TrainingError(f"cannot write in --workdir {self.workdir}: {e.strerror}") from None

  # ------------------------------------------------------------ evaluation
  def evaluate(self, state, rng_state) -> dict[str, float]:
    """The task's metrics on the evaluation split: ``eval/*`` and ``eval_ema/*``."""
    totals = self._eval_totals(state, rng_state)
    count, unreadable = totals.pop("count"), totals.pop("unreadable")
    if count == 0:
      raise TrainingError("no evaluation image could be read")
    result = {}
    for prefix, counts in _by_prefix(totals).items():
      result.update(self.task.metrics(counts, count, prefix))
    if unreadable:
      result["eval/unreadable_images"] = unreadable
    self.last_eval_totals = totals
    return result

  def _eval_totals(self, state, rng_state) -> dict[str, np.ndarray]:
    """The eval step's outputs over the split, accumulated by the task (counts: summed
    exactly, in int64 on the host)."""
    batch = self.cfg.data.eval_batch or self.cfg.train.global_batch
    totals: dict[str, np.ndarray] = {}
    try:
      for local in pipeline.eval_batches(
          self.eval_source, self.eval_example, global_batch=batch,
          process=jax.process_index(), processes=jax.process_count(),
          threads=self.cfg.data.threads):
        arrays = {k: sharding.global_batch(self.program.mesh, v) for k, v in local.items()}
        self.task.accumulate(totals, jax.device_get(
            self.program.eval_step(state, rng_state, arrays)))
    except ValueError as e:  # e.g. an image too large for the evaluation canvas
      raise TrainingError(f"evaluation: {e}") from None
    return totals

  # ------------------------------------------------------------ checkpoints
  def _restore(self):
    """``(state, data)`` of the newest intact checkpoint, or None when there is none."""
    restored = self.checkpoints.restore(self.program.abstract_state, self.program.all_finite)
    if restored is None:
      return None
    state, data, warnings = restored
    for warning in warnings:
      self._log(warning, stream=sys.stderr)
    return state, data

  def _newest_checkpoint(self) -> str:
    latest = self.checkpoints.latest_step()
    if latest is None:
      return "No checkpoint was saved before it."
    return (f"The newest checkpoint, step {latest} in {self.checkpoints.directory}, holds only "
            "finite values (checked when it was saved or restored); resuming repeats the same "
            "steps, so change the recipe first (e.g. a lower train.lr).")

  # ------------------------------------------------------------------ init
  def initial_state(self):
    """Sharded fresh state, with ``config.init_from`` weights loaded when given (what
    fits is the task's rule: ``Task.load_init``)."""
    program = self.program
    state, rng_state = program.init()
    if not self.cfg.init_from:
      return state, rng_state
    model = program.merge(jax.device_get(state), jax.device_get(rng_state))
    for line in self.task.load_init(model, self.task.init_path(self.cfg.init_from)):
      self._log(line)
    state = dict(state, params=program.params_of(model),
                 batch_stats=nnx.state(model, nnx.BatchStat))
    if "ema_params" in state:
      state["ema_params"] = state["params"]
    state["opt_state"] = program.tx.init(state["params"])
    state = jax.device_put(state, program.state_shardings)
    return state, rng_state

  # -------------------------------------------------------------------- run
  def run(self) -> dict[str, float]:
    """Trains (or, with ``mode="eval"``, evaluates); returns the last evaluation."""
    try:
      summary = self._run()
    except BaseException:
      self.close(quiet=True)
      raise
    self.close()
    return summary

  def close(self, quiet: bool = False) -> None:
    """Finishes pending checkpoint writes, stops the input threads, closes the writers,
    releases the workdir and the signal handlers. ``quiet``: a failed save is not raised
    (another error is on its way)."""
    try:
      if self._batches is not None:
        self._batches.close()
        self._batches = None
      try:
        self.checkpoints.close()
      except TrainingError:
        if not quiet:
          raise
      self.metrics.close()
    finally:
      self._release()

  def _run(self) -> dict[str, float]:
    cfg = self.cfg
    if cfg.mode == "train":  # the step compiles while the init compiles and runs
      self.program.train_step.compile_ahead(*self.program.abstract_inputs())
    state, rng_state = self.initial_state()
    position = None
    resumed = self._restore()  # the workdir's newest checkpoint wins over init_from
    if resumed is not None:
      state, position = resumed
      self._log(f"resumed from step {int(state['step'])} ({self.checkpoints.directory})")
    if cfg.mode == "eval":
      summary = self.evaluate(state, rng_state)
      self.metrics.write(int(state["step"]), summary)
      self._log("\n".join(["eval: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items())]
                          + [line for prefix, counts in _by_prefix(self.last_eval_totals).items()
                             for line in self.task.report(counts, prefix)]))
      return summary
    start = int(state["step"])
    self.metrics.start(start)
    mesh = self.program.mesh
    try:
      self._batches = pipeline.TrainIterator(
          self.train_source, self.train_example, global_batch=cfg.train.global_batch, seed=cfg.seed, process=jax.process_index(),
          processes=jax.process_count(), threads=cfg.data.threads, prefetch=cfg.data.prefetch,
          state=position)
    except ValueError as e:
      raise TrainingError(str(e)) from None
    progress = _Progress(self.total_steps, start, self.steps_per_epoch, cfg.train.global_batch)
    summary: dict[str, float] = {}
    best: tuple[float, int] | None = None
    started = time.perf_counter()
    preemption = self._preemption  # installed since __init__: a signal while compiling counts
    for step in range(start, self.total_steps):
      self.checkpoints.check()  # a background save that failed stops the run here
      batch = next(self._batches)
      state, metrics = self.program.train_step(
          state, rng_state, {k: sharding.global_batch(mesh, v) for k, v in batch.items()})
      loss = float(metrics["loss"])
      done = step + 1
      if not bool(metrics["finite"]):
        self.checkpoints.wait()
        raise TrainingError(
            f"the loss ({loss}) or the gradient norm ({float(metrics['grad_norm'])}) is not "
            f"finite at step {done}; stopped without applying it. "
            + self._newest_checkpoint())
      speed = progress.update(done, loss, float(metrics["lr"]))
      if done % cfg.log_every_steps == 0 or done == self.total_steps:
        self.metrics.write(done, {"train/loss": loss, "train/lr": metrics["lr"],
                                  "train/grad_norm": metrics["grad_norm"],
                                  "train/images_per_second": speed,
                                  "train/skipped_images": self._batches.skipped})
      if self.eval_every > 0 and (done % self.eval_every == 0 or done == self.total_steps):
        summary = self.evaluate(state, rng_state)
        self.metrics.write(done, summary)
        progress.note(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary.items()))
        score = summary[self.task.primary_metric]
        if best is None or score > best[0]:
          best = (score, done)
      stop = preemption.reached()
      if stop or done == self.total_steps or self.checkpoints.due(done):
        if not self.program.all_finite(state):
          self.checkpoints.wait()
          raise TrainingError(
              f"the state after step {done} holds non-finite values although its loss and "
              "gradients were finite (an optimizer statistic overflowed?); it was not saved. "
              + self._newest_checkpoint())
        self.checkpoints.save(done, state, self._batches.state())
      if stop:
        self.checkpoints.wait()
        progress.close()
        raise Preempted(
            f"stopped by {preemption.describe()} at step {done} of {self.total_steps}; saved "
            f"{self.checkpoints.directory / str(done)}; run the same command to resume",
            preemption.exit_code)
    self.checkpoints.wait()
    progress.close()
    if not summary and self.eval_every > 0:
      # nothing left to train (a finished run started again): report it
      summary = self.evaluate(state, rng_state)
    self._summarise(summary, best, start, time.perf_counter() - started, progress)
    return summary

  def _summarise(self, summary, best, start: int, seconds: float, progress: "_Progress"):
    """The end-of-run report: what was trained, how fast, how well, where it is."""
    lines = [f"done: step {self.total_steps} of {self.total_steps} "
             f"({self.total_steps / self.steps_per_epoch:g} epochs of {self.steps_per_epoch} "
             f"steps, global batch {self.cfg.train.global_batch})",
             "  " + (", ".join(f"{k} {v:.4f}" for k, v in summary.items())
                     or "not evaluated (config.eval_every_steps -1)")]
    for prefix, counts in _by_prefix(self.last_eval_totals).items():
      lines += self.task.report(counts, prefix)
    if best is not None:
      lines.append(f"  best {self.task.primary_metric} {best[0]:.4f} at step {best[1]}")
    if self.total_steps > start:
      lines.append(f"  this run: {self.total_steps - start} steps in {seconds:.0f} s, "
                   f"{progress.mean_speed():.1f} images/s after the first step")
    skipped = self._batches.skipped if self._batches else 0
    if skipped:
      lines.append(f"  skipped {skipped} unreadable training images")
    lines.append(f"  checkpoints: {self.workdir / 'checkpoints'}; metrics: {self.metrics.path}")
    self._log("\n".join(lines))

  def _log(self, message: str, stream=None) -> None:
    if jax.process_index() == 0:
      print(message, file=stream or sys.stdout, flush=True)


class _Progress:
  """A tqdm bar on a terminal, log lines otherwise: epoch, step, loss, LR, images/s, ETA."""

  def __init__(self, total: int, start: int, steps_per_epoch: int, batch: int):
    self.total, self.steps_per_epoch, self.batch = total, steps_per_epoch, batch
    self.last_time, self.last_step = time.perf_counter(), start
    self.speed = 0.0
    self.first: tuple[float, int] | None = None  # after the first (compiling) step
    self.bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, step: int, loss: float, lr: float) -> float:
    now = time.perf_counter()
    if now > self.last_time:
      self.speed = (step - self.last_step) * self.batch / (now - self.last_time)
    self.last_time, self.last_step = now, step
    if self.first is None:
      self.first = (now, step)
    epoch = (step - 1) // self.steps_per_epoch + 1
    text = f"epoch {epoch} loss {loss:.4f} lr {lr:.2e} {self.speed:.0f} img/s"
    if self.bar is not None:
      self.bar.set_postfix_str(text, refresh=False)
      self.bar.update(1)
    elif jax.process_index() == 0 and (step % 10 == 0 or step == self.total):
      eta = (self.total - step) * self.batch / self.speed if self.speed else float("nan")
      print(f"step {step}/{self.total} {text} eta {eta:.0f}s", flush=True)
    return self.speed

  def mean_speed(self) -> float:
    """Images per second since the first step (which includes compilation)."""
    if self.first is None or self.last_step == self.first[1]:
      return self.speed
    return (self.last_step - self.first[1]) * self.batch / (self.last_time - self.first[0])

  def note(self, message: str) -> None:
    if self.bar is not None:
      self.bar.write(message)
    elif jax.process_index() == 0:
      print(message, flush=True)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
