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
