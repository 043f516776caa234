"""InternImage and DCNv3 in JAX / Flax NNX.

``from internimage_jax import ops, models, convert`` gives the public API. Submodules
load on first use, so ``python -m internimage_jax.convert`` runs without importing
itself twice.
"""

import importlib

__all__ = ["convert", "models", "ops", "predict"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
