"""The main job: train (with periodic evaluation) an InternImage from a config.

    python train.py --config configs/quickstart.py --workdir /tmp/quickstart
    python train.py --config configs/quickstart.py --config.train.epochs=5 --workdir DIR
    python train.py --config configs/internimage_t_1k_224.py:bf16 --workdir DIR \\
        --config.data.dir=/data/tfds

Re-running the same command resumes from the newest complete checkpoint in --workdir.
SIGTERM or Ctrl-C saves a checkpoint at the next step boundary and exits (143 or 130).
Several processes (hosts): start the same command in each with ``--distributed`` (TPU
pods, SLURM and other clusters JAX detects) or with ``--coordinator_address``,
``--num_processes`` and ``--process_id``. Errors are one line (``error: ...``, exit
code 1); ``--verbose`` (or ``INTERNIMAGE_VERBOSE=1``) shows tracebacks and library logs.
"""

import os
import re
import sys
import warnings

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (file.py[:variant])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints and metrics.jsonl go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (cluster auto-detection)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.DEFINE_bool("verbose", False, "tracebacks for errors, and the libraries' log messages")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def _verbose(argv=()) -> bool:
  return os.environ.get("INTERNIMAGE_VERBOSE", "") not in ("", "0") or "--verbose" in argv


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _config_path(argv) -> str:
  """The value of the last ``--config`` (the one absl keeps)."""
  path = ""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _parse_flags(argv):
  """absl's parsing, with every problem (a typo in an override, a config file that is
  missing or raises) in one line."""
  if _verbose(argv):
    return FLAGS(argv)
  try:
    rest = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when read
    return rest
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    _fail(str(e) if cause is None else _config_problem(argv, cause))
  except Exception as e:  # noqa: BLE001 - raised by the config file or an override
    _fail(_config_problem(argv, e))


def _config_problem(argv, error: BaseException) -> str:
  path = _config_path(argv).split(":", 1)[0]
  if path and not os.path.isfile(path):
    return f"config file not found: {path}"
  if isinstance(error, (KeyError, AttributeError)):
    # ml_collections wraps "'globl_batch'\nDid you mean "global_batch" instead of ...?"
    text = error
    while isinstance(text, BaseException) and text.args:
      text = text.args[0]
    text = str(text)
    key = re.match(r"'([^'\n]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    return (f"unknown config key {key.group(1) if key else text.splitlines()[0]} in an "
            "override" + (f" (did you mean {hint.group(1)}?)" if hint else ""))
  while error.__cause__ is not None and "earlier failure" in str(error):
    error = error.__cause__
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  # ml_collections puts the config file's own traceback in the message: keep its last line.
  text = lines[-1] if any("Traceback" in line for line in lines) else " ".join(lines)
  return f"config {_config_path(argv)}: {text}"


class _QuietLibraries:
  """Drops the libraries' own error logs: orbax logs each failed background write with
  its traceback, and asyncio each of its writes' futures; the run reports the failure
  itself, in one line."""

  def filter(self, record) -> bool:
    return "/orbax/" not in record.pathname and record.name != "asyncio"


def _quiet_unraisable(unraisable) -> None:
  # Tensorstore completes the writes of a failed orbax save after orbax closed their
  # event loop, and each completion raises this where nobody can catch it; the failure
  # itself is reported, in one line.
  value = unraisable.exc_value
  if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def main(argv):
  del argv
  verbose = FLAGS.verbose or _verbose()
  # Orbax logs every save step at INFO; progress and results are printed by the trainer.
  logging.set_verbosity(logging.WARNING)
  if not verbose:
    logging.get_absl_handler().addFilter(_QuietLibraries())
    sys.unraisablehook = _quiet_unraisable
    # The same failed writes' coroutines, reported once more at exit.
    warnings.filterwarnings("ignore", r"coroutine '.*' was never awaited", RuntimeWarning)
  import jax

  if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from internimage_jax.training.trainer import Preempted, Trainer, TrainingError

  try:
    Trainer(FLAGS.config, FLAGS.workdir).run()
  except Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except TrainingError as e:
    if verbose:
      raise
    _fail(str(e))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
