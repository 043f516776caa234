"""The main job: train (with periodic evaluation) an InternImage from a config.

    python train.py --config configs/quickstart.py --workdir /tmp/quickstart
    python train.py --config configs/quickstart.py --config.train.epochs=5 --workdir DIR

Re-running the same command resumes from the newest complete checkpoint in --workdir.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "ml_collections config file (file.py[:variant])",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints and metrics.jsonl go")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  # Orbax logs every save step at INFO; progress and results are printed by the trainer.
  logging.set_verbosity(logging.WARNING)
  from internimage_jax.training.trainer import Trainer, TrainingError

  try:
    Trainer(FLAGS.config, FLAGS.workdir).run()
  except TrainingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
