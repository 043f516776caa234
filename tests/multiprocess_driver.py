"""Driver of tests/test_multiprocess.py (run as a script, one copy per process).

    python tests/multiprocess_driver.py train WORKDIR OUT.npz [jax.distributed args]
    python tests/multiprocess_driver.py restore WORKDIR OUT.npz --mesh data=2,fsdp=4

``train`` runs the quickstart's ``h`` variant for a few steps (checkpointing at the
end), then reopens the checkpoint on the same mesh and writes every state leaf, gathered
from all processes, to OUT.npz (process 0). ``restore`` restores the same checkpoint
on another mesh of this process's devices and writes the leaves the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402


def _config(mesh: str | None):
  spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config("h")
  cfg.train.epochs = 0.15  # 3 steps of 64 images
  cfg.log_every_steps = 1
  cfg.eval_every_steps = 1000
  if mesh:
    cfg.mesh.update({k: int(v) for k, v in (item.split("=") for item in mesh.split(","))})
  return cfg


def _dump(state, path: Path) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(state)
  gathered = multihost_utils.process_allgather([leaf for _, leaf in leaves], tiled=True)
  if jax.process_index() == 0:
    np.savez(path, **{jax.tree_util.keystr(k): np.asarray(v)
                      for (k, _), v in zip(leaves, gathered)})


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["train", "restore"])
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--mesh", default=None)
  parser.add_argument("--coordinator_address", default=None)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args()
  if args.coordinator_address:
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  from internimage_jax.training.trainer import Trainer

  cfg = _config(args.mesh)
  if args.mode == "train":
    Trainer(cfg, args.workdir).run()
  trainer = Trainer(cfg, args.workdir)
  try:
    state, _ = trainer._restore()
    mesh = dict(trainer.program.mesh.shape)
    print(f"restored on mesh {mesh} over {jax.process_count()} process(es)", flush=True)
    _dump(state, Path(args.out))
  finally:
    trainer.close()


if __name__ == "__main__":
  main()
