import os
import sys
from pathlib import Path

# Let `pytest` run from a plain checkout too (the package is normally pip-installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import QUICK_CODEGEN  # noqa: E402

# Every program the tests compile in-process gets quick codegen too (a fifth off the
# model tests on two cores; the goldens hold at the same tolerances). XLA reads the
# flags when its CPU backend starts, after this.
os.environ["XLA_FLAGS"] = f"{QUICK_CODEGEN} {os.environ.get('XLA_FLAGS', '')}".strip()


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def classification_quickstart(tmp_path_factory):
  """The classification quickstart's run as documented (its workdir), trained once for
  the segmentation and detection quickstarts that start from it: under pytest-xdist the
  workers share one run (a lock file in their common temporary folder)."""
  from filelock import FileLock

  from helpers import run_quickstart

  shared = tmp_path_factory.getbasetemp().parent  # the same for every xdist worker
  workdir = shared / "classification_quickstart"
  with FileLock(str(shared / "classification_quickstart.lock")):
    done = shared / "classification_quickstart.done"
    if not done.is_file():
      run_quickstart(workdir, quick_codegen=False)
      done.write_text("")
  return workdir
