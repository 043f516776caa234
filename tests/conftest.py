import sys
from pathlib import Path

# Let `pytest` run from a plain checkout too (the package is normally pip-installed).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
