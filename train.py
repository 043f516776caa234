"""The main job: train (with periodic evaluation) an InternImage from a config.

    python train.py --config configs/quickstart.py --workdir /tmp/quickstart
    python train.py --config configs/quickstart.py --config.train.epochs=5 --workdir DIR
    python train.py --config configs/internimage_t_1k_224.py:bf16 --workdir DIR \\
        --config.data.dir=/data/tfds

Re-running the same command resumes from the newest complete checkpoint in --workdir.
Several processes (hosts): start the same command in each with ``--distributed`` (TPU
pods, SLURM and other clusters JAX detects) or with ``--coordinator_address``,
``--num_processes`` and ``--process_id``.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (file.py[:variant])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints and metrics.jsonl go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (cluster auto-detection)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs)")
flags.DEFINE_integer("num_processes", None, "number of processes (multi-process runs)")
flags.DEFINE_integer("process_id", None, "this process's index (multi-process runs)")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Orbax logs every save step at INFO; progress and results are printed by the trainer.
  logging.set_verbosity(logging.WARNING)
  import jax

  if FLAGS.distributed or FLAGS.coordinator_address or FLAGS.num_processes:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from internimage_jax.training.trainer import Trainer, TrainingError

  try:
    Trainer(FLAGS.config, FLAGS.workdir).run()
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
