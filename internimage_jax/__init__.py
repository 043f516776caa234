"""InternImage and DCNv3 in JAX / Flax NNX."""

from internimage_jax import convert, models, ops

__all__ = ["convert", "models", "ops"]
__version__ = "0.1.0"
